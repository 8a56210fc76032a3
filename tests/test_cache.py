"""Verbalization cache and call journal: keys, compute-once, persistence, threads and processes."""

from __future__ import annotations

import base64
import copy
import io
import multiprocessing
import sqlite3
import threading
from pathlib import Path
from typing import Any

import dspy
import pytest
from PIL import Image as PILImage
from together import run_together

from blpo_dspy.cache import CallJournal, SQLiteStore, VerbalizationCache, content_key, lm_identity
from blpo_dspy.images import image_sha256
from blpo_dspy.modules import ImageJudge
from blpo_dspy.task import Task
from blpo_dspy.testing import ScriptedEngine

ALIGNMENT = Task.load("alignment")


def _image(colour: tuple[int, int, int]) -> dspy.Image:
    buffer = io.BytesIO()
    PILImage.new("RGB", (6, 6), colour).save(buffer, format="PNG")
    return dspy.Image(f"data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}")


def _lm(model: str = "vlm", **kwargs: Any) -> dspy.LM:
    return ScriptedEngine().lm(model, **kwargs)


# --------------------------------------------------------------------------------------------- keys
def test_content_key_is_stable_and_ignores_dict_order() -> None:
    assert content_key("a", {"x": 1, "y": 2}) == content_key("a", {"y": 2, "x": 1})
    assert content_key("a", 1) != content_key("a", "1")
    assert len(content_key()) == 64


def test_lm_identity_has_model_and_decoding_but_no_credentials() -> None:
    lm = dspy.LM("openai/gpt-4o-mini", api_key="sk-SECRET-KEY", api_base="http://10.0.0.1:9", temperature=0.3)
    identity = lm_identity(lm)
    assert identity == {"model": "openai/gpt-4o-mini", "decoding": {"temperature": 0.3}}
    assert "SECRET" not in repr(identity)
    assert "10.0.0.1" not in repr(identity)
    assert lm_identity(None) == {"model": None}
    assert lm_identity(_lm("m", max_tokens=50, seed=3))["decoding"] == {"max_tokens": 50, "seed": 3}


BASE: dict[str, Any] = {
    "image_sha256": "a" * 64,
    "instruction": "Describe the image.",
    "lm": ("vlm", {}),
    "text_fields": {"prompt": "a cat"},
}


@pytest.mark.parametrize(
    ("component", "value"),
    [
        ("image_sha256", "b" * 64),
        ("instruction", "Describe the image!"),
        ("lm", ("other-vlm", {})),
        ("lm", ("vlm", {"temperature": 0.7})),
        ("lm", ("vlm", {"max_tokens": 64})),
        ("text_fields", {"prompt": "a dog"}),
        ("text_fields", {}),
    ],
)
def test_key_differs_on_each_component(component: str, value: Any) -> None:
    def key(parts: dict[str, Any]) -> str:
        model, kwargs = parts["lm"]
        return VerbalizationCache.key(
            image_sha256=parts["image_sha256"],
            instruction=parts["instruction"],
            lm=_lm(model, **kwargs),
            text_fields=parts["text_fields"],
        )

    assert key(BASE) == key(dict(BASE))  # same components, same key (new LM objects)
    assert key(BASE) != key({**BASE, component: value})


# --------------------------------------------------------------------------------------------- compute once
def test_get_or_compute_computes_once_and_stores_provenance(tmp_path: Path) -> None:
    cache = VerbalizationCache(tmp_path / "cache.sqlite")
    image, lm = _image((1, 2, 3)), _lm()
    computed: list[int] = []

    def compute() -> str:
        computed.append(1)
        return "A dark square."

    args = {"image": image, "instruction": "q", "lm": lm, "text_fields": {"prompt": "p"}}
    first = cache.get_or_compute(**args, compute=compute)
    second = cache.get_or_compute(**args, compute=compute)
    assert (first.description, first.cached) == ("A dark square.", False)
    assert (second.description, second.cached) == ("A dark square.", True)
    assert len(computed) == 1
    assert (cache.misses, cache.hits) == (1, 1)
    assert len(cache) == 1

    key = cache.key(image_sha256=image_sha256(image), instruction="q", lm=lm, text_fields={"prompt": "p"})
    stored = cache.store.get(VerbalizationCache.namespace, key)
    assert stored == {
        "description": "A dark square.",
        "image_sha256": image_sha256(image),
        "instruction": "q",
        "model": "scripted/vlm",
    }
    other = cache.get_or_compute(**{**args, "instruction": "q2"}, compute=compute)
    assert other.cached is False
    assert len(computed) == 2


def test_get_or_compute_returns_the_stored_description_after_a_race(tmp_path: Path) -> None:
    cache = VerbalizationCache(tmp_path / "cache.sqlite")
    image, lm = _image((7, 7, 7)), _lm()
    key = cache.key(image_sha256=image_sha256(image), instruction="q", lm=lm, text_fields={})

    def compute_while_another_thread_finishes_first() -> str:
        cache.put(key, "from the other thread", image_sha256=image_sha256(image), instruction="q", model="m")
        return "from this thread"

    result = cache.get_or_compute(
        image=image, instruction="q", lm=lm, text_fields={}, compute=compute_while_another_thread_finishes_first
    )
    # Every caller must see the one stored description, or a resumed run can judge on a different text.
    assert result.description == cache.get(key) == "from the other thread"


def test_entries_persist_across_instances_and_first_writer_wins(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "cache.sqlite"
    first = VerbalizationCache(path)
    first.put("k1", "first", image_sha256="s", instruction="q", model="m")
    first.put("k1", "second", image_sha256="s", instruction="q", model="m")
    assert first.get("k1") == "first"
    second = VerbalizationCache(path)
    assert second.get("k1") == "first"
    assert second.get("k2") is None
    assert len(second) == 1
    assert (second.hits, second.misses) == (1, 1)


def test_cache_and_store_deepcopy_return_themselves(tmp_path: Path) -> None:
    cache = VerbalizationCache(tmp_path / "c.sqlite")
    assert copy.deepcopy(cache) is cache
    assert copy.deepcopy(cache.store) is cache.store
    with pytest.raises(TypeError, match="not picklable"):
        cache.store.__getstate__()


def test_two_threads_lose_nothing(tmp_path: Path) -> None:
    cache = VerbalizationCache(tmp_path / "cache.sqlite")
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(60):
                cache.put(f"own-{worker}-{i}", f"w{worker}-{i}", image_sha256="s", instruction="q", model="m")
                cache.put(f"shared-{i}", f"shared-{i}", image_sha256="s", instruction="q", model="m")
                assert cache.get(f"own-{worker}-{i}") == f"w{worker}-{i}"
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(cache) == 4 * 60 + 60
    assert all(cache.get(f"own-{w}-{i}") == f"w{w}-{i}" for w in range(4) for i in range(60))


def _write_from_process(path: str, worker: int, count: int) -> None:
    cache = VerbalizationCache(path)
    journal = CallJournal(path)
    for i in range(count):
        cache.put(f"own-{worker}-{i}", f"w{worker}-{i}", image_sha256="s", instruction="q", model="m")
        cache.put(f"shared-{i}", f"from {worker}", image_sha256="s", instruction="q", model="m")
        journal.put("judge", f"{worker}-{i}", {"label": "yes", "worker": worker})


def test_two_processes_writing_one_file_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    VerbalizationCache(path)  # schema created up front, as a compile does
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_from_process, args=(str(path), w, 150)) for w in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]

    cache, journal = VerbalizationCache(path), CallJournal(path)
    assert len(cache) == 2 * 150 + 150
    assert all(cache.get(f"own-{w}-{i}") == f"w{w}-{i}" for w in range(2) for i in range(150))
    assert all(cache.get(f"shared-{i}") in ("from 0", "from 1") for i in range(150))
    assert journal.store.count("judge") == 300
    assert journal.get("judge", "1-149") == {"label": "yes", "worker": 1}
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _open_new_files_together(directory: str, worker: int, rounds: int, barrier: Any) -> None:
    for r in range(rounds):
        barrier.wait(timeout=60)  # every process opens the same new file at the same moment
        path = Path(directory) / f"round-{r}" / "cache.sqlite"
        CallJournal(path).put("judge", f"{worker}", {"worker": worker})
        VerbalizationCache(path).put(f"{worker}", "d", image_sha256="s", instruction="q", model="m")


def test_processes_opening_one_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Switching a new file to WAL mode is refused at once (no busy wait) while another process holds it: a worker
    started beside others died with "database is locked" before the retry."""
    n, rounds = 4, 5
    assert run_together(_open_new_files_together, tmp_path, n, rounds) == [0] * n
    for r in range(rounds):
        path = tmp_path / f"round-{r}" / "cache.sqlite"
        assert CallJournal(path).store.count("judge") == n
        assert len(VerbalizationCache(path)) == n
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_file_that_is_not_a_database_gets_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "not-a-db.sqlite"
    path.write_bytes(b"this is not a SQLite database, it is long enough to have a header" * 4)
    with pytest.raises(sqlite3.DatabaseError, match=r"^not-a-db\.sqlite: file is not a database"):
        SQLiteStore(path)


# --------------------------------------------------------------------------------------------- journal
def test_call_journal_get_put_and_namespaces(tmp_path: Path) -> None:
    path = tmp_path / "run" / "journal.sqlite"
    journal = CallJournal(path)
    assert journal.get("judge", "k") is None
    journal.put("judge", "k", {"label": "no", "rationale": "r", "raw": None})
    journal.put("judge", "k", {"label": "yes"})  # first writer wins
    assert journal.get("judge", "k") == {"label": "no", "rationale": "r", "raw": None}
    assert journal.get("proposer", "k") is None
    journal.put("proposer", "k", {"new_instruction": "x"})
    assert CallJournal(path).get("proposer", "k") == {"new_instruction": "x"}
    assert copy.deepcopy(journal) is journal
    assert journal.store.count("judge") == 1


def test_store_close_reopens_on_next_use(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "s.sqlite")
    store.put("ns", "k", [1, "two", {"three": 3.0}])
    store.close()
    assert store.get("ns", "k") == [1, "two", {"three": 3.0}]


# --------------------------------------------------------------------------------------------- with ImageJudge
def test_program_with_cache_verbalizes_each_image_once_per_instruction(tmp_path: Path) -> None:
    vision = ScriptedEngine(rules=[lambda c: {"description": "A square."} if c.role == "verbalizer" else None])
    judge = ScriptedEngine(rules=[lambda c: {"rationale": "r", "label": "yes"}])
    program = ImageJudge(ALIGNMENT, judge_sees="text", verbalizer_lm=vision.lm("vlm"), judge_lm=judge.lm())
    cache = VerbalizationCache(tmp_path / "cache.sqlite")
    program.set_cache(cache)
    red, blue = _image((200, 0, 0)), _image((0, 0, 200))

    for _ in range(3):
        program(image=red, prompt="p")
    assert vision.count("verbalizer") == 1
    assert judge.count("judge") == 3
    assert judge.calls[-1].inputs["description"] == "A square."

    program(image=blue, prompt="p")
    program(image=red, prompt="another prompt")
    assert vision.count("verbalizer") == 3

    copy_ = program.with_instructions(verbalizer="Count things.")
    assert copy_.verbalizer.cache is cache  # program copies share the cache
    copy_(image=red, prompt="p")
    assert vision.count("verbalizer") == 4
    assert len(cache) == 4

    # A second compile with the same file and model finds everything.
    fresh = ImageJudge(ALIGNMENT, judge_sees="text", verbalizer_lm=vision.lm("vlm"), judge_lm=judge.lm())
    fresh.set_cache(VerbalizationCache(tmp_path / "cache.sqlite"))
    fresh(image=red, prompt="p")
    assert vision.count("verbalizer") == 4
    # Another verbalizer model does not reuse the descriptions.
    other = ImageJudge(ALIGNMENT, judge_sees="text", verbalizer_lm=vision.lm("vlm-2"), judge_lm=judge.lm())
    other.set_cache(cache)
    other(image=red, prompt="p")
    assert vision.count("verbalizer") == 5
