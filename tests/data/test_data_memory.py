"""A 10,000-row manifest loads without keeping image bytes (or PIL images) in memory."""

from __future__ import annotations

import gc
import os
import tracemalloc
from pathlib import Path

from PIL import Image

from blpo_dspy.data import load_manifest
from blpo_dspy.images import LazyImage

ROWS = 10_000
FILES = 30
SIDE = 600  # random RGB pixels: each PNG is about 1.1 MB and does not compress


def test_ten_thousand_rows_hold_no_image_bytes(tmp_path: Path, write_csv, safety) -> None:
    images = tmp_path / "images"
    images.mkdir()
    sizes = []
    for i in range(FILES):
        path = images / f"img{i:02d}.png"
        Image.frombytes("RGB", (SIDE, SIDE), os.urandom(SIDE * SIDE * 3)).save(path, compress_level=0)
        sizes.append(path.stat().st_size)
    rows = [[f"r{i}", f"images/img{i % FILES:02d}.png", "safe" if i % 2 else "unsafe"] for i in range(ROWS)]
    manifest = write_csv(tmp_path / "big.csv", ["id", "image", "label"], rows)
    referenced_bytes = sum(sizes[i % FILES] for i in range(ROWS))

    gc.collect()
    tracemalloc.start()
    try:
        examples = load_manifest(manifest, safety)
        gc.collect()
        retained, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert len(examples) == ROWS
    assert referenced_bytes > 10_000_000_000  # what holding the bytes per row would cost
    assert sum(sizes) > 30_000_000  # what holding each file's bytes once would cost
    assert retained < 16_000_000  # 10,000 examples, ids and paths only (about 9 MB)
    assert peak < 24_000_000  # files are read one at a time while validating
    for example in examples[:: ROWS // 50]:
        assert isinstance(example.image, LazyImage) and example.image.url.startswith("blpo-lazy://")
        assert len(example.image.url) < 100
        assert not any(isinstance(v, bytes | Image.Image) for v in example.toDict().values())
        assert not any(isinstance(v, bytes | Image.Image) for v in (example.image.__pydantic_private__ or {}).values())
