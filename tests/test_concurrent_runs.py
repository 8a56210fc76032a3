"""Two ``blpo compile`` processes at once sharing one verbalization cache: no corruption, no lost result.

Both runs use the scripted ``CountingWorld`` (``tests/cli_lms.py``) on the same data with different seeds, so they
explore differently but verbalize many of the same (image, instruction) pairs, racing for the same cache keys. A start
barrier makes them call the LM at the same time, and a small per-call latency keeps them overlapping.
"""

from __future__ import annotations

from pathlib import Path

from cli_lms import (
    DATA_SEED,
    N_EXAMPLES,
    ROLES,
    CompileProcess,
    CompileResult,
    integrity,
    journal_mode,
    made_verbalizations,
    run_together,
    verbalizations,
    write_manifest,
)

from blpo_dspy.testing import CountingWorld

SEEDS = (0, 1)
THREADS = 2
LATENCY = 0.01


def _span(result: CompileResult) -> tuple[float, float]:
    return min(c.started for c in result.calls), max(c.finished for c in result.calls)


def test_two_compiles_sharing_one_cache_finish_without_corruption_or_lost_results(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "data", CountingWorld().examples(N_EXAMPLES, seed=DATA_SEED))
    shared = tmp_path / "shared-cache.sqlite"
    barrier = (tmp_path / "barrier", len(SEEDS))
    together = run_together(
        [
            CompileProcess(
                tmp_path, f"shared-{seed}", manifest, seed=seed, threads=THREADS, cache=shared, latency=LATENCY,
                barrier=barrier,
            )
            for seed in SEEDS
        ]
    )  # fmt: skip
    # the same runs, each with its own cache (run side by side too: they share no file)
    alone = run_together(
        [CompileProcess(tmp_path, f"alone-{seed}", manifest, seed=seed, threads=THREADS) for seed in SEEDS]
    )
    for result in (*together, *alone):
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.state_reads > 1  # state.json parsed at every poll while running

    # the runs really overlapped: each answered LM calls while the other was calling too
    (start_a, end_a), (start_b, end_b) = (_span(r) for r in together)
    overlap = min(end_a, end_b) - max(start_a, start_b)
    assert overlap > 0.5 * min(end_a - start_a, end_b - start_b), (start_a, end_a, start_b, end_b)
    for mine, other in (together, together[::-1]):
        other_start, other_end = _span(other)
        during = sum(other_start <= c.started <= other_end for c in mine.calls)
        assert during > len(mine.calls) // 2

    # nothing is corrupt
    assert journal_mode(shared) == "wal"
    assert integrity(shared) == "ok"
    for result in together:
        assert integrity(result.run_dir / "cache.sqlite") == integrity(result.run_dir / "study.db") == "ok"

    # each run decided exactly what it decides alone, and the two seeds searched differently
    for shared_run, alone_run in zip(together, alone, strict=True):
        assert shared_run.outcome() == alone_run.outcome()
    assert together[0].outcome()["history"] != together[1].outcome()["history"]

    # no result is lost: the shared cache holds every verbalization either run made, and exactly the union of what
    # the two runs store alone (with the same descriptions)
    cache = verbalizations(shared)
    alone_caches = [verbalizations(r.run_dir / "cache.sqlite") for r in alone]
    assert set(cache) == set(alone_caches[0]) | set(alone_caches[1])
    for alone_cache in alone_caches:
        assert all(cache[key]["description"] == value["description"] for key, value in alone_cache.items())
    for result in together:
        assert verbalizations(result.run_dir / "cache.sqlite") == {}  # --cache took every verbalization
        made = made_verbalizations(result.run_dir)
        assert made and made <= set(cache)
        stored_pairs = {(v["image_sha256"], v["instruction"]) for v in cache.values()}
        asked = {(c.images[0], c.instructions) for c in result.calls if c.role == "verbalizer"}
        assert asked and asked <= stored_pairs

    # sharing saved verbalizer calls; the other roles made the calls they make alone
    usage = [r.state()["usage"] for r in together]
    usage_alone = [r.state()["usage"] for r in alone]
    assert (
        len(cache) <= sum(u["verbalizer"]["calls"] for u in usage) < sum(u["verbalizer"]["calls"] for u in usage_alone)
    )
    for u, u_alone in zip(usage, usage_alone, strict=True):
        for role in ROLES:
            seen = u[role]["calls"] + u[role]["cache_hits"]
            assert seen == u_alone[role]["calls"] + u_alone[role]["cache_hits"], role
        assert u["judge"]["calls"] == u_alone["judge"]["calls"]
        assert u["proposer"]["calls"] == u_alone["proposer"]["calls"]
