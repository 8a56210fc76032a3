"""Benchmark: peak RSS of ``load_manifest`` on a 10,000-row CSV manifest (few hundred small PNGs).

Run: ``.venv/bin/python benchmarks/manifest_memory.py`` (no network; writes its data to a temp dir).
The load runs in a fresh subprocess, which reports its ``ru_maxrss`` after importing ``dspy`` and ``blpo_dspy``
(baseline) and after loading (peak). Target: peak < 500 MB.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

N_ROWS = 10_000
N_IMAGES = 300
REPO = Path(__file__).resolve().parents[1]

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    sys.path.insert(0, sys.argv[2])
    import dspy  # noqa: F401
    import blpo_dspy  # noqa: F401
    from blpo_dspy.data.manifest import load_manifest
    from blpo_dspy.task import Task

    def rss_mb():
        # ru_maxrss is KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    task = Task.load("alignment")
    baseline = rss_mb()
    start = time.perf_counter()
    examples = load_manifest(sys.argv[1], task)
    seconds = time.perf_counter() - start
    print(json.dumps({"rows": len(examples), "baseline_mb": baseline, "peak_mb": rss_mb(), "seconds": seconds}))
    """
)


def write_manifest(root: Path) -> Path:
    """Write ``N_IMAGES`` small PNGs and an ``N_ROWS``-row CSV manifest pointing at them; return the CSV path."""
    from PIL import Image

    images = root / "images"
    images.mkdir()
    for i in range(N_IMAGES):
        Image.new("RGB", (32, 32), (i % 256, (i * 7) % 256, 90)).save(images / f"img{i:04d}.png")
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "image", "prompt", "label"])
        for row in range(N_ROWS):
            writer.writerow(
                [
                    f"r{row}",
                    f"images/img{row % N_IMAGES:04d}.png",
                    f"a picture number {row}",
                    "yes" if row % 2 else "no",
                ]
            )
    return manifest


def main() -> None:
    """Run the benchmark and print its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp))
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(manifest), str(REPO)],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        )
        elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"load_manifest subprocess failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, base = result["peak_mb"], result["baseline_mb"]
    print(
        f"load_manifest {result['rows']} rows / {N_IMAGES} PNGs: load={result['seconds']:.2f}s "
        f"(subprocess total {elapsed:.2f}s) | baseline RSS after imports={base:.1f} MB | peak RSS={peak:.1f} MB | "
        f"peak/baseline={peak / base:.2f}x, delta={peak - base:.1f} MB | target peak < 500 MB: "
        f"{'PASS' if peak < 500 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
