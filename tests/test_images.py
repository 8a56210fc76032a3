"""Image identity and lazy loading: LazyImage, image_sha256, image_bytes, check_image_file."""

from __future__ import annotations

import base64
import copy
import hashlib
import re
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import dspy
import pytest
from PIL import Image as PILImage

from blpo_dspy.images import ImageFileError, LazyImage, check_image_file, image_bytes, image_sha256


def _png(path: Path, colour: tuple[int, int, int] = (10, 200, 30), size: tuple[int, int] = (16, 12)) -> Path:
    PILImage.new("RGB", size, colour).save(path, format="PNG")
    return path


def _jpeg(path: Path) -> Path:
    PILImage.effect_noise((48, 40), 60).convert("RGB").save(path, format="JPEG", quality=90)
    return path


def _lazy(path: Path) -> LazyImage:
    return LazyImage(path, hashlib.sha256(path.read_bytes()).hexdigest())


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# --------------------------------------------------------------------------------------------- LazyImage
def test_lazy_image_formats_to_a_data_uri_with_the_file_bytes(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    image = _lazy(path)
    assert image.url == "blpo-lazy://" + hashlib.sha256(path.read_bytes()).hexdigest()
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert image.path == path

    uri = image.data_uri()
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    assert base64.b64decode(uri.removeprefix(prefix)) == path.read_bytes()
    assert image.format() == [{"type": "image_url", "image_url": {"url": uri}}]
    assert image.read_bytes() == path.read_bytes()


def test_lazy_image_mime_from_extension_and_explicit(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "photo.jpg")
    assert _lazy(path).data_uri().startswith("data:image/jpeg;base64,")
    explicit = LazyImage(path, hashlib.sha256(path.read_bytes()).hexdigest(), mime="image/webp")
    assert explicit.data_uri().startswith("data:image/webp;base64,")


def test_lazy_image_is_a_dspy_image_and_serialises_lazily(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    image = _lazy(path)
    assert isinstance(image, dspy.Image)
    rendered = str(image)  # what adapters put into the prompt: the formatted image block
    assert base64.b64encode(path.read_bytes()).decode("ascii") in rendered


def test_lazy_image_deepcopy_returns_itself(tmp_path: Path) -> None:
    image = _lazy(_png(tmp_path / "a.png"))
    assert copy.deepcopy(image) is image
    example = dspy.Example(image=image, prompt="p").with_inputs("image", "prompt")
    assert copy.deepcopy(example).image is image


def test_lazy_image_copy_rebuilds_an_equal_image(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    image = _lazy(path)
    clone = copy.copy(image)  # goes through __reduce__
    assert isinstance(clone, LazyImage)
    assert clone == image
    assert clone.path == path
    assert clone.read_bytes() == path.read_bytes()


def test_lazy_image_repr_names_the_file_not_its_directory(tmp_path: Path) -> None:
    image = _lazy(_png(tmp_path / "cat.png"))
    text = repr(image)
    assert "cat.png" in text
    assert str(tmp_path) not in text
    assert image.sha256[:12] in text


def test_equal_files_give_equal_images(tmp_path: Path) -> None:
    first = _lazy(_png(tmp_path / "a.png"))
    second = _lazy(_png(tmp_path / "b.png"))
    other = _lazy(_png(tmp_path / "c.png", colour=(1, 2, 3)))
    assert first.url == second.url
    assert first.url != other.url


def test_changed_file_raises_image_file_error(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    image = _lazy(path)
    _png(path, colour=(0, 0, 0))
    with pytest.raises(ImageFileError, match=re.escape("a.png: image changed on disk")) as err:
        image.format()
    assert str(tmp_path) not in str(err.value)
    with pytest.raises(ImageFileError, match="SHA-256 mismatch"):
        image_bytes(image)


def test_vanished_file_raises_image_file_error(tmp_path: Path) -> None:
    path = _png(tmp_path / "gone.png")
    image = _lazy(path)
    path.unlink()
    with pytest.raises(ImageFileError, match=re.escape("gone.png: cannot read image")):
        image.read_bytes()


# --------------------------------------------------------------------------------------------- identity
def test_image_sha256_equal_for_lazy_and_from_path(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png")
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert image_sha256(_lazy(path)) == expected
    assert image_sha256(dspy.Image.from_path(str(path))) == expected
    assert image_sha256(dspy.Image.from_path(str(_png(tmp_path / "b.png", colour=(9, 9, 9))))) != expected


def test_image_sha256_of_a_remote_url_hashes_the_url() -> None:
    url = "https://example.com/cat.png"
    assert image_sha256(dspy.Image(url)) == hashlib.sha256(url.encode("utf-8")).hexdigest()


def test_image_bytes(tmp_path: Path) -> None:
    path = _jpeg(tmp_path / "a.jpg")
    assert image_bytes(_lazy(path)) == path.read_bytes()
    assert image_bytes(dspy.Image.from_path(str(path))) == path.read_bytes()
    with pytest.raises(ImageFileError, match="remote URL"):
        image_bytes(dspy.Image("https://example.com/cat.png"))


# --------------------------------------------------------------------------------------------- check_image_file
@pytest.mark.parametrize("maker", [_png, _jpeg], ids=["png", "jpeg"])
def test_check_image_file_returns_digest_and_size(tmp_path: Path, maker: Callable[[Path], Path]) -> None:
    path = maker(tmp_path / ("ok.png" if maker is _png else "ok.jpg"))
    digest, size = check_image_file(path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    with PILImage.open(path) as img:
        assert size == img.size


def _truncated(tmp_path: Path, name: str, maker: Callable[[Path], Path]) -> Path:
    path = maker(tmp_path / f"full-{name}")
    data = path.read_bytes()
    target = tmp_path / name
    target.write_bytes(data[: len(data) // 2])
    return target


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "missing.png: image file does not exist"),
        ("empty", "empty.png: image file is empty"),
        ("truncated_png", "truncated.png: not a readable image"),
        ("truncated_jpeg", "truncated.jpg: not a readable image"),
        ("not_an_image", "notes.png: not a readable image"),
        ("directory", "folder.png: not a regular file"),
    ],
)
def test_check_image_file_errors(tmp_path: Path, case: str, message: str) -> None:
    if case == "missing":
        path = tmp_path / "missing.png"
    elif case == "empty":
        path = tmp_path / "empty.png"
        path.write_bytes(b"")
    elif case == "truncated_png":
        path = _truncated(tmp_path, "truncated.png", _png)
    elif case == "truncated_jpeg":
        path = _truncated(tmp_path, "truncated.jpg", _jpeg)
    elif case == "not_an_image":
        path = tmp_path / "notes.png"
        path.write_text("hello, I am text", encoding="utf-8")
    else:
        path = tmp_path / "folder.png"
        path.mkdir()
    with pytest.raises(ImageFileError) as err:
        check_image_file(path)
    assert message in str(err.value)
    assert str(tmp_path) not in str(err.value)


def test_check_image_file_refuses_more_pixels_than_max_pixels(tmp_path: Path) -> None:
    path = _png(tmp_path / "big.png", size=(200, 100))
    assert check_image_file(path, max_pixels=20_000)[1] == (200, 100)
    with pytest.raises(ImageFileError, match=r"big\.png: 200x100 = 20,000 pixels exceeds the limit of 19,999"):
        check_image_file(path, max_pixels=19_999)


def test_check_image_file_refuses_a_decompression_bomb_header(tmp_path: Path) -> None:
    # A 100,000 x 100,000 RGB PNG header with no pixel data: Pillow must refuse it before decoding anything.
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    with pytest.raises(ImageFileError, match=r"bomb\.png: .*decompression bomb"):
        check_image_file(path)


def test_check_image_file_honours_a_max_pixels_above_pillows_default(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    PILImage.new("1", (10_000, 10_000)).save(path)  # 100 MP, 12 kB on disk, 12.5 MB decoded
    assert check_image_file(path, max_pixels=200_000_000)[1] == (10_000, 10_000)
