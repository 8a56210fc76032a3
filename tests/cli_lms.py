"""Scripted LMs for ``blpo`` subprocesses: ``--judge-lm py:cli_lms:world_lm`` (with ``tests/`` on ``PYTHONPATH``).

Every role of one process shares one ``CountingWorld`` engine, so a ``blpo compile`` runs fully scripted. Four
environment variables, read when the first LM is built, drive the process from the outside:

- ``BLPO_TEST_KILL_AT=k``: the process sends itself SIGKILL at the start of its k-th LM call (1-based): the k-th call
  is never answered, calls 1..k-1 were (with ``--threads 1``; with more threads some may still be in flight): an
  exact kill point.
- ``BLPO_TEST_LATENCY=s``: every call sleeps ``s`` seconds before answering (to make concurrent runs overlap).
- ``BLPO_TEST_CALL_LOG=path``: every answered call appends one JSON line to ``path`` (see ``CallLogEntry``).
- ``BLPO_TEST_BARRIER=folder:n``: before its first call the process waits until ``n`` processes reached that point
  (each leaves a file in ``folder``), so concurrent runs start calling the LM together.

The tests write the world's examples as a CSV manifest of PNG files with ``write_manifest``, run ``blpo compile``
with ``CompileProcess`` and read the stores of a run directory with ``journal_counts`` and ``integrity``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import dspy

from blpo_dspy.images import image_bytes
from blpo_dspy.testing import CountingWorld, ScriptedCall, parse_request

KILL_AT_ENV = "BLPO_TEST_KILL_AT"
LATENCY_ENV = "BLPO_TEST_LATENCY"
CALL_LOG_ENV = "BLPO_TEST_CALL_LOG"
BARRIER_ENV = "BLPO_TEST_BARRIER"
MODEL = "world"
BARRIER_TIMEOUT = 120.0
SPEC = "py:cli_lms:world_lm"
TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
ROLES = ("verbalizer", "judge", "proposer")
# a small compile: 24 examples (12 train, 8 val, no test split so every LM call belongs to the compile)
N_EXAMPLES = 24
DATA_SEED = 5
COMPILE_OPTIONS = (
    "--split-sizes", "train=12,val=8", "--judge-sees", "text", "--outer-steps", "2", "--inner-steps", "3",
    "--error-batch-size", "4", "--retain-batch-size", "3",
)  # fmt: skip


@dataclass(frozen=True)
class CallLogEntry:
    """One answered LM call of a scripted ``blpo`` process.

    Attributes:
        pid: The process.
        index: 1-based order of the call in its process (by start).
        started: ``time.time()`` when the call started.
        finished: ``time.time()`` when it was answered.
        role: ``verbalizer``, ``judge`` or ``proposer``.
        request: SHA-256 of the request's content (system prompt, user text and image bytes).
        images: SHA-256 of each image in the request, in order.
        instructions: The signature instructions of the request.
    """

    pid: int
    index: int
    started: float
    finished: float
    role: str
    request: str
    images: tuple[str, ...]
    instructions: str


class InstrumentedWorldEngine:
    """The ``CountingWorld`` engine with an exact kill point, a latency and a call log.

    Args:
        kill_at: SIGKILL this process at the start of the ``kill_at``-th call (1-based); ``None`` never.
        latency: Seconds each call sleeps before answering.
        call_log: JSONL file each answered call is appended to; ``None`` keeps no log.
        barrier: ``(folder, n)``: before the first call, wait until ``n`` processes have arrived in ``folder``.
    """

    def __init__(
        self,
        *,
        kill_at: int | None = None,
        latency: float = 0.0,
        call_log: Path | None = None,
        barrier: tuple[Path, int] | None = None,
    ) -> None:
        self.world = CountingWorld(latency=latency)  # the world's engine sleeps before answering
        self.kill_at = kill_at
        self.call_log = call_log
        self.barrier = barrier
        self.started = 0
        self._lock = threading.Lock()
        self._barrier_passed = threading.Event()

    def __deepcopy__(self, memo: dict[int, Any]) -> InstrumentedWorldEngine:
        return self

    def complete(self, request: Any) -> Any:
        """Answer one request (or die at the kill point)."""
        if self.barrier is not None and not self._barrier_passed.is_set():
            self._wait_at_barrier(*self.barrier)
        began = time.time()
        with self._lock:
            self.started += 1
            index = self.started
        if self.kill_at is not None and index >= self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        response = self.world.engine.complete(request)
        if self.call_log is not None:
            self._log(self.call_log, index, began, parse_request(request))
        return response

    def _wait_at_barrier(self, folder: Path, n: int) -> None:
        with self._lock:
            if self._barrier_passed.is_set():
                return
            folder.mkdir(parents=True, exist_ok=True)
            (folder / str(os.getpid())).touch()
            deadline = time.monotonic() + BARRIER_TIMEOUT
            while sum(1 for _ in folder.iterdir()) < n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"barrier: fewer than {n} processes arrived in {BARRIER_TIMEOUT:.0f} s")
                time.sleep(0.005)
            self._barrier_passed.set()

    def _log(self, path: Path, index: int, began: float, call: ScriptedCall) -> None:
        images = tuple(hashlib.sha256(data).hexdigest() for field in call.images.values() for data in field)
        content = json.dumps([call.system, call.user_text, images], ensure_ascii=False)
        entry = CallLogEntry(
            pid=os.getpid(),
            index=index,
            started=began,
            finished=time.time(),
            role=call.role,
            request=hashlib.sha256(content.encode("utf-8")).hexdigest(),
            images=images,
            instructions=call.instructions,
        )
        line = json.dumps(asdict(entry), ensure_ascii=False) + "\n"
        with self._lock, path.open("a", encoding="utf-8") as handle:
            handle.write(line)

    def close(self) -> None:
        """Nothing to release."""

    def dump_state(self) -> dict[str, Any]:
        """Engines are never saved with programs."""
        return {"model": MODEL}


_ENGINE: InstrumentedWorldEngine | None = None
_ENGINE_LOCK = threading.Lock()


def _engine() -> InstrumentedWorldEngine:
    global _ENGINE
    with _ENGINE_LOCK:
        if _ENGINE is None:
            kill_at = os.environ.get(KILL_AT_ENV)
            log = os.environ.get(CALL_LOG_ENV)
            barrier = os.environ.get(BARRIER_ENV)
            folder, _, n = (barrier or "").rpartition(":")
            _ENGINE = InstrumentedWorldEngine(
                kill_at=int(kill_at) if kill_at else None,
                latency=float(os.environ.get(LATENCY_ENV) or 0.0),
                call_log=Path(log) if log else None,
                barrier=(Path(folder), int(n)) if barrier else None,
            )
        return _ENGINE


def world_lm(role: str) -> dspy.LM:
    """The LM for any role: this process's instrumented ``CountingWorld`` engine (one engine for every role).

    Args:
        role: ``verbalizer``, ``judge`` or ``proposer`` (the world answers by the request's output fields).
    """
    return dspy.LM(f"scripted/{MODEL}", engine=_engine(), cache=False)


def write_manifest(folder: Path, examples: list[dspy.Example]) -> Path:
    """Write ``CountingWorld`` examples as PNG files plus ``manifest.csv`` (id, image, prompt, label).

    Args:
        folder: Destination folder (created); images go to ``folder/images``.
        examples: Examples with ``id``, ``image``, ``prompt`` and ``label``.

    Returns:
        The manifest path.
    """
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for example in examples:
        name = f"{example.id}.png"
        (images / name).write_bytes(image_bytes(example.image))
        rows.append({"id": example.id, "image": f"images/{name}", "prompt": example.prompt, "label": example.label})
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def read_call_log(path: Path) -> list[CallLogEntry]:
    """The entries of a call log, in file order (an absent file is an empty log)."""
    if not path.exists():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        data = json.loads(line)
        data["images"] = tuple(data["images"])
        entries.append(CallLogEntry(**data))
    return entries


# ---------------------------------------------------------------------- running `blpo compile` in subprocesses
@dataclass
class CompileResult:
    """A finished ``blpo compile`` subprocess, with its run directory's JSON files as they were when it exited.

    Attributes:
        returncode: The exit code (``-9`` after SIGKILL).
        run_dir: Its run directory.
        stdout: Its standard output.
        stderr: Its standard error (logs).
        calls: The LM calls it answered (from its call log).
        state_reads: How many times ``state.json`` was read and parsed while the process ran.
        state_changes: ``(time.time(), status, finished outer steps)`` each time a read saw these change.
        state_at_exit: ``state.json`` when the process exited (``None`` if absent).
        program_at_exit: ``program.json`` when the process exited (``None`` if absent).
    """

    returncode: int
    run_dir: Path
    stdout: str
    stderr: str
    calls: list[CallLogEntry]
    state_reads: int
    state_changes: list[tuple[float, str, int]]
    state_at_exit: dict[str, Any] | None
    program_at_exit: dict[str, Any] | None

    def state(self) -> dict[str, Any]:
        """``state.json`` as the process left it."""
        assert self.state_at_exit is not None, f"{self.run_dir.name}: no state.json"
        return self.state_at_exit

    def program(self) -> dict[str, Any]:
        """``program.json`` as the process left it."""
        assert self.program_at_exit is not None, f"{self.run_dir.name}: no program.json"
        return self.program_at_exit

    def outcome(self) -> dict[str, Any]:
        """What the compile decided: final instructions and score, stop reason, search history and selection rounds."""
        state, program = self.state(), self.program()
        return {
            "status": state["status"],
            "incumbent": state["incumbent"],
            "history": state["history"],
            "rounds": state["rounds"],
            "program_instructions": program["blpo"]["instructions"],
            "best_score": program["blpo"]["diagnostics"]["best_score_"],
            "stop_reason": program["blpo"]["diagnostics"]["stop_reason_"],
        }

    def calls_by_role(self) -> dict[str, int]:
        """Answered LM calls per role."""
        return {role: sum(1 for c in self.calls if c.role == role) for role in ROLES}


@dataclass
class CompileProcess:
    """One ``blpo compile`` of the scripted world in a subprocess, watched while it runs.

    Args:
        workdir: Working directory of the process (the run directory, call log and outputs go here).
        run_name: Name of the run directory inside ``workdir``.
        manifest: The data manifest.
        attempt: Name of this attempt (its call log is ``workdir/<run_name>.<attempt>.calls.jsonl``).
        seed: ``--seed``.
        threads: ``--threads``.
        resume: Pass ``--resume``.
        cache: ``--cache`` (a shared verbalization cache), or ``None``.
        kill_at: SIGKILL the process at the start of this LM call (1-based).
        latency: Seconds per LM call.
        barrier: ``(folder, n)`` start barrier shared with other processes.
        extra: More ``blpo compile`` options.
    """

    workdir: Path
    run_name: str
    manifest: Path
    attempt: str = "run"
    seed: int = 0
    threads: int = 1
    resume: bool = False
    cache: Path | None = None
    kill_at: int | None = None
    latency: float = 0.0
    barrier: tuple[Path, int] | None = None
    extra: tuple[str, ...] = ()
    state_reads: int = field(default=0, init=False)
    state_changes: list[tuple[float, str, int]] = field(default_factory=list, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _outputs: tuple[IO[bytes], IO[bytes]] | None = field(default=None, init=False, repr=False)

    @property
    def run_dir(self) -> Path:
        """The run directory."""
        return self.workdir / self.run_name

    @property
    def call_log(self) -> Path:
        """This attempt's call log."""
        return self.workdir / f"{self.run_name}.{self.attempt}.calls.jsonl"

    def command(self) -> list[str]:
        """The command line."""
        command = [sys.executable, "-m", "blpo_dspy.cli", "compile", "alignment", "--data", str(self.manifest)]
        command += ["--verbalizer-lm", SPEC, "--judge-lm", SPEC, "--proposer-lm", SPEC, *COMPILE_OPTIONS]
        command += ["--run-dir", str(self.run_dir), "--seed", str(self.seed), "--threads", str(self.threads)]
        if self.cache is not None:
            command += ["--cache", str(self.cache)]
        if self.resume:
            command.append("--resume")
        return command + list(self.extra)

    def environment(self) -> dict[str, str]:
        """The process environment: ``tests/`` importable, offline LiteLLM, DSPy's cache in ``workdir``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLPO_TEST_")}
        path = [str(TESTS), str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        env.update(
            PYTHONPATH=os.pathsep.join(path),
            LITELLM_LOCAL_MODEL_COST_MAP="True",
            DSPY_CACHEDIR=str(self.workdir / "dspy-cache"),
        )
        env[CALL_LOG_ENV] = str(self.call_log)
        if self.kill_at is not None:
            env[KILL_AT_ENV] = str(self.kill_at)
        if self.latency:
            env[LATENCY_ENV] = str(self.latency)
        if self.barrier is not None:
            env[BARRIER_ENV] = f"{self.barrier[0]}:{self.barrier[1]}"
        return env

    def start(self) -> CompileProcess:
        """Start the process."""
        self.call_log.unlink(missing_ok=True)
        stem = self.workdir / f"{self.run_name}.{self.attempt}"
        out, err = open(f"{stem}.stdout", "wb"), open(f"{stem}.stderr", "wb")  # closed in result()
        self._outputs = (out, err)
        self._proc = subprocess.Popen(self.command(), cwd=self.workdir, env=self.environment(), stdout=out, stderr=err)
        return self

    def running(self) -> bool:
        """Whether the process is still running."""
        assert self._proc is not None, "start() first"
        return self._proc.poll() is None

    def check_state(self) -> None:
        """Read ``state.json`` (if written yet); it must always parse as a JSON object."""
        path = self.run_dir / "state.json"
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise AssertionError(f"{self.run_name}: state.json is not valid JSON while running: {exc}") from exc
        assert isinstance(state, dict) and "status" in state, f"{self.run_name}: state.json has no status"
        self.state_reads += 1
        seen = (state["status"], len(state.get("rounds", [])))
        if not self.state_changes or self.state_changes[-1][1:] != seen:
            self.state_changes.append((time.time(), *seen))

    def kill(self) -> None:
        """SIGKILL the process (used only on a timeout)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def result(self) -> CompileResult:
        """Collect the finished process."""
        assert self._proc is not None and self._outputs is not None, "start() first"
        returncode = self._proc.wait()
        for handle in self._outputs:
            handle.close()
        stem = self.workdir / f"{self.run_name}.{self.attempt}"
        return CompileResult(
            returncode=returncode,
            run_dir=self.run_dir,
            stdout=Path(f"{stem}.stdout").read_text(encoding="utf-8", errors="replace"),
            stderr=Path(f"{stem}.stderr").read_text(encoding="utf-8", errors="replace"),
            calls=read_call_log(self.call_log),
            state_reads=self.state_reads,
            state_changes=list(self.state_changes),
            state_at_exit=_read_json(self.run_dir / "state.json"),
            program_at_exit=_read_json(self.run_dir / "program.json"),
        )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def run_together(processes: Sequence[CompileProcess], *, timeout: float = 180.0) -> list[CompileResult]:
    """Start the processes at once and check their ``state.json`` every few milliseconds until all have exited.

    Raises:
        AssertionError: A ``state.json`` did not parse, or the processes outlived ``timeout`` (they are killed).
    """
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.running() for p in processes):
            for process in processes:
                process.check_state()
            if time.monotonic() > deadline:
                raise AssertionError(f"blpo compile still running after {timeout:.0f} s")
            time.sleep(0.005)
        for process in processes:
            process.check_state()
    finally:
        for process in processes:
            process.kill()
    return [p.result() for p in processes]


def run_one(process: CompileProcess, *, timeout: float = 180.0) -> CompileResult:
    """Run one process to its end (see ``run_together``)."""
    return run_together([process], timeout=timeout)[0]


# ---------------------------------------------------------------------- reading a run's SQLite files
def _connect(path: Path) -> closing[sqlite3.Connection]:
    if not path.exists():
        raise FileNotFoundError(f"no SQLite file {path.name}")
    return closing(sqlite3.connect(path, timeout=30.0))


def integrity(path: Path) -> str:
    """``PRAGMA integrity_check`` of a SQLite file (``"ok"`` when sound)."""
    with _connect(path) as conn:
        return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))


def journal_mode(path: Path) -> str:
    """The journal mode of a SQLite file (``"wal"`` for the stores of a run)."""
    with _connect(path) as conn:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])


def journal_counts(run_dir: Path) -> dict[str, int]:
    """Finished LM results journaled in a run directory's ``cache.sqlite``, per role.

    A verbalization counts when it is both journaled as made by the run and stored in the cache beside it (the
    journal entry is written first, so a kill between the two writes leaves a result that was never used).
    """
    with _connect(run_dir / "cache.sqlite") as conn:

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])

        return {
            "verbalizer": count(
                "SELECT COUNT(*) FROM entries m JOIN entries v ON v.key = m.key AND v.namespace = 'verbalization' "
                "WHERE m.namespace = 'verbalization_made'"
            ),
            "judge": count("SELECT COUNT(*) FROM entries WHERE namespace = 'judge'"),
            "proposer": count("SELECT COUNT(*) FROM entries WHERE namespace = 'proposer'"),
        }


def verbalizations(path: Path) -> dict[str, dict[str, Any]]:
    """The verbalization cache entries of a SQLite file: key -> stored value."""
    with _connect(path) as conn:
        rows = conn.execute("SELECT key, value FROM entries WHERE namespace = 'verbalization'").fetchall()
    return {key: json.loads(value) for key, value in rows}


def made_verbalizations(run_dir: Path) -> set[str]:
    """Keys of the verbalizations a run made itself (its journal's ``verbalization_made`` entries)."""
    with _connect(run_dir / "cache.sqlite") as conn:
        rows = conn.execute("SELECT key FROM entries WHERE namespace = 'verbalization_made'").fetchall()
    return {row[0] for row in rows}
