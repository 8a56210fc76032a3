"""The ``blpo`` command line: tasks, synth, compile, worker, evaluate, compare, report, demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

logger = logging.getLogger("blpo_dspy.cli")

DEFAULT_SPLITS = {"train": 0.5, "val": 0.25, "test": 0.25}
_LM_SPEC_HELP = (
    "LM spec for the verbalizer: a DSPy/LiteLLM model string (openai/gpt-4o), 'local', 'factsheet', or "
    "'py:module:attribute' (your own dspy.LM, or a factory called with role=...)"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``blpo`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "LiteLLM", "dspy", "optuna"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.handler(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError, ImportError) as exc:
        logger.debug("error", exc_info=True)
        print(f"blpo: error: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blpo", description="Compile human-aligned image judges with BLPO on DSPy.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tasks", help="list the built-in task cards")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(handler=_cmd_tasks)

    p = sub.add_parser("synth", help="write the SYNTHETIC compliance dataset (images + manifest.csv)")
    p.add_argument("--out", required=True, type=Path, help="output folder (images/, manifest.csv, specs.jsonl)")
    p.add_argument("--n", type=int, default=60, help="number of banners (class-balanced)")
    p.add_argument(
        "--variant", choices=["binary", "ordinal"], default="binary", help="task card: compliance | compliance_ordinal"
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_cmd_synth)

    p = sub.add_parser("compile", help="optimize a judge program with BLPO")
    p.add_argument("task", help="built-in task name or path to a task card (.toml)")
    _data_args(p)
    p.add_argument("--verbalizer-lm", required=True, help=_LM_SPEC_HELP)
    p.add_argument("--judge-lm", required=True, help="LM spec for the judge (same forms as --verbalizer-lm)")
    p.add_argument("--proposer-lm", required=True, help="LM spec for the proposer, text only (same forms)")
    p.add_argument("--judge-sees", choices=["image", "text", "both"], default="image")
    p.add_argument("--run-dir", required=True, type=Path, help="run directory (state, study, cache, program)")
    p.add_argument("--resume", action="store_true", help="continue a killed compile in --run-dir")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="verbalization cache (SQLite) to share across runs (default: in --run-dir)",
    )
    p.add_argument(
        "--allow-workers",
        action="store_true",
        help="let `blpo worker` processes evaluate the selection trials through the shared Optuna study",
    )
    p.add_argument(
        "--study-storage",
        default=None,
        help="Optuna storage URL of the round studies (default: sqlite:///RUN_DIR/study.db; postgresql://... for "
        "workers on other machines)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-calls", type=int, default=None, help="cap on the total number of LM calls")
    p.add_argument("--outer-steps", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--error-batch-size", type=int, default=10)
    p.add_argument("--retain-batch-size", type=int, default=10)
    p.add_argument("--selection", choices=["guarded", "paper"], default="guarded")
    p.add_argument("--metric", default="primary", help="selection metric name (default: the task's primary)")
    p.add_argument("--threads", type=int, default=8)
    p.set_defaults(handler=_cmd_compile)

    p = sub.add_parser("worker", help="evaluate selection trials of a compile started with --allow-workers")
    p.add_argument("run_dir", type=Path, help="the compile's run directory")
    p.add_argument("--data", required=True, type=Path, help="the compile's --data (its validation examples are used)")
    p.add_argument("--images", type=Path, default=None, help="the compile's --images")
    p.add_argument("--verbalizer-lm", required=True, help="the compile's verbalizer LM spec")
    p.add_argument("--judge-lm", required=True, help="the compile's judge LM spec")
    p.add_argument("--storage", default=None, help="the compile's --study-storage (default: in the run directory)")
    p.add_argument("--cache", type=Path, default=None, help="the compile's --cache, if it used one")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--idle-timeout", type=float, default=600.0, help="stop after this many seconds without work")
    p.add_argument("--name", default=None, help="name recorded on the trials this worker claims (default: worker-PID)")
    p.set_defaults(handler=_cmd_worker)

    p = sub.add_parser("evaluate", help="evaluate a saved program on a split")
    p.add_argument("program", type=Path, help="program.json written by compile")
    _data_args(p)
    p.add_argument("--split", default="test", help="split to evaluate (from splits.json beside the program) or 'all'")
    p.add_argument("--verbalizer-lm", default=None, help="LM spec for the verbalizer (text/both judges)")
    p.add_argument("--judge-lm", required=True, help="LM spec for the judge")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--json-out", type=Path, default=None, help="also write the evaluation as JSON")
    p.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser("compare", help="BLPO vs baselines vs DSPy built-ins on identical splits and seeds")
    p.add_argument("task", help="built-in task name or path to a task card (.toml)")
    _data_args(p)
    p.add_argument("--optimizers", default="no-opt,blpo,fixed-i2t,judge-prompt-i2t,opro,mipro,copro,gepa")
    p.add_argument("--seeds", default="3", help="a count (3) or a comma list (0,1,2)")
    p.add_argument("--verbalizer-lm", required=True, help=_LM_SPEC_HELP)
    p.add_argument("--judge-lm", required=True, help="LM spec for the judge (same forms as --verbalizer-lm)")
    p.add_argument("--proposer-lm", required=True, help="LM spec for the proposer, text only (same forms)")
    p.add_argument("--judge-sees", choices=["image", "text", "both"], default="image")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--max-calls", type=int, default=None)
    p.add_argument("--outer-steps", type=int, default=5)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--error-batch-size", type=int, default=10)
    p.add_argument("--retain-batch-size", type=int, default=10)
    p.add_argument("--proposer-supports-images", choices=["auto", "yes", "no"], default="no")
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--bootstrap-resamples", type=int, default=1000)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_cmd_compare)

    p = sub.add_parser("report", help="write report.md and report.html for a run directory")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(handler=_cmd_report)

    p = sub.add_parser("demo", help="offline demo: synthetic compliance task, seed vs BLPO on the local stack")
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"))
    p.add_argument("--quality", action="store_true", help="use the 1.5B model (slower, better)")
    p.add_argument("--n", type=int, default=None, help="number of synthetic banners (default: a 20-minute budget)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.set_defaults(handler=_cmd_demo)
    return parser


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=Path, help="CSV/JSONL manifest, or a folder of class subfolders")
    p.add_argument("--images", type=Path, default=None, help="image root (default: the manifest's folder)")
    p.add_argument("--split-sizes", default=None, help="e.g. train=0.5,val=0.25,test=0.25 (or counts)")
    p.add_argument("--split-seed", type=int, default=0)


# ---------------------------------------------------------------------- commands
def _cmd_tasks(args: argparse.Namespace) -> int:
    from blpo_dspy.task import Task, builtin_task_names

    tasks = [Task.load(name) for name in builtin_task_names()]
    if args.json:
        print(json.dumps([t.to_dict() for t in tasks], indent=2))
        return 0
    width = max(len(t.name) for t in tasks)
    for task in tasks:
        inputs = ", ".join(task.input_fields)
        print(f"{task.name:<{width}}  {task.kind:<8}  labels: {task.label_space_text:<28}  inputs: {inputs}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from blpo_dspy.data.synthetic import make_compliance_dataset

    manifest = make_compliance_dataset(args.out, args.n, variant=args.variant, seed=args.seed)
    task = "compliance" if args.variant == "binary" else "compliance_ordinal"
    print(f"SYNTHETIC compliance dataset ({args.n} banners, task card {task!r}): {manifest}")
    return 0


def _load_task(spec: str) -> Any:
    from blpo_dspy.task import Task

    return Task.load(spec)


def _load_examples(args: argparse.Namespace, task: Any) -> list[Any]:
    from blpo_dspy.data import load_folder, load_manifest

    if args.data.is_dir():
        return load_folder(args.data, task)
    return load_manifest(args.data, task, image_root=args.images)


def _parse_sizes(text: str | None) -> dict[str, float | int]:
    if not text:
        return dict(DEFAULT_SPLITS)
    sizes: dict[str, float | int] = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--split-sizes: expected name=value, got {item!r}")
        sizes[name.strip()] = float(value) if "." in value else int(value)
    return sizes


def _split(args: argparse.Namespace, examples: list[Any]) -> dict[str, list[Any]]:
    from blpo_dspy.data import stratified_split

    return stratified_split(examples, sizes=_parse_sizes(args.split_sizes), seed=args.split_seed)


def _cmd_compile(args: argparse.Namespace) -> int:
    from blpo_dspy.cache import CallJournal, VerbalizationCache
    from blpo_dspy.evaluation import evaluate
    from blpo_dspy.lm_specs import build_lm
    from blpo_dspy.modules import ImageJudge
    from blpo_dspy.teleprompt import BLPO

    task = _load_task(args.task)
    examples = _load_examples(args, task)
    splits = _split(args, examples)
    for name in ("train", "val"):
        if not splits.get(name):
            raise ValueError(f"the {name} split is empty; adjust --split-sizes")
    args.run_dir.mkdir(parents=True, exist_ok=True)
    _write_splits(args.run_dir / "splits.json", splits, args)
    verbalizer_lm = build_lm(args.verbalizer_lm, role="verbalizer")
    judge_lm = build_lm(args.judge_lm, role="judge")
    proposer_lm = build_lm(args.proposer_lm, role="proposer")
    program = ImageJudge(task, judge_sees=args.judge_sees, verbalizer_lm=verbalizer_lm, judge_lm=judge_lm)
    optimizer = BLPO(
        metric=args.metric,
        proposer_lm=proposer_lm,
        outer_steps=args.outer_steps,
        inner_steps=args.inner_steps,
        error_batch_size=args.error_batch_size,
        retain_batch_size=args.retain_batch_size,
        num_threads=args.threads,
        seed=args.seed,
        selection=args.selection,
        max_calls=args.max_calls,
        run_dir=args.run_dir,
        resume=args.resume,
        cache_path=args.cache,
        study_storage=args.study_storage,
        allow_workers=args.allow_workers,
        progress=True,
    )
    compiled = optimizer.compile(program, trainset=splits["train"], valset=splits["val"])
    print(
        f"stopped: {compiled.stop_reason_}; validation {compiled.metric_name_}: "
        f"{_fmt(compiled.seed_score_)} (seed) -> {_fmt(compiled.best_score_)} (compiled)"
    )
    print(json.dumps(compiled.best_instructions_, indent=2, ensure_ascii=False))
    if splits.get("test"):
        # Journaled in the run directory and on the compile's verbalization cache: a resumed compile replays the
        # held-out examples (and verbalizations) finished before the kill instead of asking them again.
        journal = CallJournal(args.run_dir / "cache.sqlite")
        cache = VerbalizationCache(args.cache or args.run_dir / "cache.sqlite")
        evaluations = args.run_dir / "evaluations"
        evaluations.mkdir(exist_ok=True)
        for name, candidate in (("seed", program), ("compiled", compiled)):
            candidate = candidate.deepcopy()
            candidate.set_cache(cache)
            report = evaluate(candidate, splits["test"], num_threads=args.threads, seed=args.seed, journal=journal)
            (evaluations / f"{name}.json").write_text(json.dumps(report.to_dict(), indent=2, default=str))
            replayed = f"; {report.replayed} replayed from the run's journal" if report.replayed else ""
            print(f"\nheld-out test split, {name} program (n={report.n}{replayed}):\n{report.table()}")
    _write_report(args.run_dir)
    print(f"\nprogram: {args.run_dir / 'program.json'}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import time

    from blpo_dspy.lm_specs import build_lm
    from blpo_dspy.modules import ImageJudge
    from blpo_dspy.task import Task
    from blpo_dspy.teleprompt.workers import SelectionWorker

    state_path = args.run_dir / "state.json"
    deadline = time.monotonic() + args.idle_timeout
    while not state_path.exists():  # the worker may start before the compile
        if time.monotonic() > deadline:
            raise FileNotFoundError(f"no compile in '{args.run_dir.name}' (no state.json) after {args.idle_timeout} s")
        time.sleep(0.5)
    shown = f"{args.run_dir.name}/state.json"
    try:
        identity = json.loads(state_path.read_text(encoding="utf-8"))["identity"]
        task_card, judge_sees = identity["task"], identity["judge_sees"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        problem = f"not a compile's state (fields identity.task, identity.judge_sees): {exc}"
        raise ValueError(f"{shown}: {problem}") from exc
    task = Task.from_dict(task_card, source=shown)
    program = ImageJudge(
        task,
        judge_sees=judge_sees,
        verbalizer_lm=build_lm(args.verbalizer_lm, role="verbalizer"),
        judge_lm=build_lm(args.judge_lm, role="judge"),
    )
    worker = SelectionWorker(
        args.run_dir,
        program,
        _load_examples(args, task),
        storage=args.storage,
        cache_path=args.cache,
        num_threads=args.threads,
        idle_timeout=args.idle_timeout,
        name=args.name,
    )
    report = worker.serve()
    print(f"worker stopped ({report.stop_reason}): {len(report.trials)} trial(s) evaluated")
    for study, number, candidate, state in report.trials:
        print(f"  {study} trial {number}: candidate {candidate} {state}")
    return 0


def _write_report(run_dir: Path) -> None:
    from blpo_dspy.report import write_report

    try:
        paths = write_report(run_dir)
    except ImportError as exc:
        logger.warning("%s; writing the report without plots", exc)
        paths = write_report(run_dir, plots=False)
    print(f"report: {paths.md} and {paths.html}")


def _cmd_compare(args: argparse.Namespace) -> int:
    from blpo_dspy.compare import run_compare
    from blpo_dspy.lm_specs import build_lm

    task = _load_task(args.task)
    examples = _load_examples(args, task)
    seeds: int | list[int] = [int(s) for s in args.seeds.split(",")] if "," in args.seeds else int(args.seeds)
    supports = {"auto": None, "yes": True, "no": False}[args.proposer_supports_images]
    result = run_compare(
        task,
        examples,
        optimizers=[name.strip() for name in args.optimizers.split(",") if name.strip()],
        seeds=seeds,
        judge_sees=args.judge_sees,
        verbalizer_lm=build_lm(args.verbalizer_lm, role="verbalizer"),
        judge_lm=build_lm(args.judge_lm, role="judge"),
        proposer_lm=build_lm(args.proposer_lm, role="proposer"),
        out_dir=args.out_dir,
        num_threads=args.threads,
        max_calls=args.max_calls,
        split_sizes=_parse_sizes(args.split_sizes),
        split_seed=args.split_seed,
        outer_steps=args.outer_steps,
        inner_steps=args.inner_steps,
        error_batch_size=args.error_batch_size,
        retain_batch_size=args.retain_batch_size,
        proposer_supports_images=supports,
        n_resamples=args.bootstrap_resamples,
        overwrite=args.overwrite,
    )
    print(result.markdown)
    _write_report(args.out_dir)
    return 1 if result.failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    _write_report(args.run_dir)
    return 0


def _write_splits(path: Path, splits: dict[str, list[Any]], args: argparse.Namespace) -> None:
    data = {
        "seed": args.split_seed,
        "sizes": _parse_sizes(args.split_sizes),
        "ids": {name: [str(e.id) for e in examples] for name, examples in splits.items()},
    }
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from blpo_dspy.evaluation import evaluate
    from blpo_dspy.lm_specs import build_lm
    from blpo_dspy.persistence import load_program

    judge_lm = build_lm(args.judge_lm, role="judge")
    verbalizer_lm = build_lm(args.verbalizer_lm, role="verbalizer") if args.verbalizer_lm else None
    program = load_program(args.program, verbalizer_lm=verbalizer_lm, judge_lm=judge_lm)
    if program.judge_sees != "image" and verbalizer_lm is None:
        raise ValueError(
            f"this program's judge reads verbalizations (judge_sees={program.judge_sees}); pass --verbalizer-lm"
        )
    examples = _load_examples(args, program.task)
    if args.split != "all":
        splits_file = args.program.parent / "splits.json"
        if splits_file.exists():
            wanted = set(json.loads(splits_file.read_text(encoding="utf-8"))["ids"].get(args.split, []))
            if not wanted:
                raise ValueError(f"{splits_file.name}: no split named {args.split!r}")
            examples = [e for e in examples if str(e.id) in wanted]
        else:
            examples = _split(args, examples).get(args.split, [])
        if not examples:
            raise ValueError(f"split {args.split!r} is empty for these data")
    report = evaluate(program, examples, num_threads=args.threads)
    print(
        f"{program.task.name}: {args.split} split, n={report.n}, parse failures "
        f"{report.parse_failure_rate:.1%}, errors {report.error_count}"
    )
    print(report.table())
    if args.json_out:
        args.json_out.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from blpo_dspy.demo import run_demo

    result = run_demo(run_dir=args.run_dir, quality=args.quality, n=args.n, seed=args.seed, resume=args.resume)
    print(result.summary())
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
