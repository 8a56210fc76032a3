"""Image identity and lazy loading.

``LazyImage`` is a ``dspy.Image`` whose bytes stay on disk until an adapter formats it for an LM call, so a
10,000-row manifest does not hold 10,000 base64 strings in memory. Every image is identified by the SHA-256 of
its bytes; that digest keys the verbalization cache.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import warnings
from functools import lru_cache
from pathlib import Path
from typing import Any

import dspy
import pydantic
from PIL import Image as PILImage

_LAZY_SCHEME = "blpo-lazy://"
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 0.25 GB of 24-bit pixels)


class ImageFileError(ValueError):
    """An image file cannot be used. The message names the file (and, from loaders, the row and field)."""


class LazyImage(dspy.Image):
    """A ``dspy.Image`` backed by a file that is read only when the image is sent to an LM.

    Attributes:
        url: ``blpo-lazy://<sha256>``; a content identifier, so equal files give equal images.
    """

    _path: str = pydantic.PrivateAttr(default="")
    _mime: str = pydantic.PrivateAttr(default="image/png")

    def __init__(self, path: str | Path, sha256: str, mime: str | None = None) -> None:
        pydantic.BaseModel.__init__(self, url=f"{_LAZY_SCHEME}{sha256}")
        self._path = str(path)
        self._mime = mime or mimetypes.guess_type(str(path))[0] or "image/png"

    @property
    def sha256(self) -> str:
        """SHA-256 of the image bytes (hex)."""
        return self.url.removeprefix(_LAZY_SCHEME)

    @property
    def path(self) -> Path:
        """The file behind this image."""
        return Path(self._path)

    def read_bytes(self) -> bytes:
        """Read the file and check it still has the digest it was loaded with.

        Raises:
            ImageFileError: The file vanished or changed since it was loaded.
        """
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ImageFileError(f"{self.path.name}: cannot read image: {exc.strerror or exc}") from exc
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ImageFileError(f"{self.path.name}: image changed on disk since it was loaded (SHA-256 mismatch)")
        return data

    def data_uri(self) -> str:
        """The image as a base64 data URI."""
        return f"data:{self._mime};base64,{base64.b64encode(self.read_bytes()).decode('ascii')}"

    @lru_cache(maxsize=8)  # noqa: B019 - bounded; mirrors dspy.Image.format
    def format(self) -> list[dict[str, Any]] | str:
        """Format for an LM request (reads the file now)."""
        return [{"type": "image_url", "image_url": {"url": self.data_uri()}}]

    def __repr__(self) -> str:
        return f"LazyImage(file={self.path.name!r}, sha256={self.sha256[:12]}…)"

    def __deepcopy__(self, memo: dict[int, Any]) -> LazyImage:
        return self  # immutable; avoids copying across DSPy's module deep copies

    def __reduce__(self) -> tuple[Any, ...]:
        return (LazyImage, (self._path, self.sha256, self._mime))


def image_sha256(image: dspy.Image) -> str:
    """SHA-256 (hex) of an image's bytes: from the file for ``LazyImage``, decoded base64 for data URIs.

    Remote URLs (not downloaded) are identified by the hash of the URL string itself.
    """
    if isinstance(image, LazyImage):
        return image.sha256
    url = image.url
    if url.startswith("data:") and "base64," in url:
        return hashlib.sha256(base64.b64decode(url.split("base64,", 1)[1])).hexdigest()
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


def image_bytes(image: dspy.Image) -> bytes:
    """The raw bytes of an image held as a file or a data URI.

    Raises:
        ImageFileError: The image is a remote URL (not downloaded) or unreadable.
    """
    if isinstance(image, LazyImage):
        return image.read_bytes()
    url = image.url
    if url.startswith("data:") and "base64," in url:
        return base64.b64decode(url.split("base64,", 1)[1])
    raise ImageFileError(f"image {url[:60]!r} is a remote URL; download it first")


def check_image_file(path: Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, tuple[int, int]]:
    """Validate an image file without keeping it in memory.

    Reads the bytes once for the digest, opens the header with Pillow (which checks the pixel count before
    decoding), and verifies the file structure.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels (decompression-bomb guard).

    Returns:
        ``(sha256_hex, (width, height))``.

    Raises:
        ImageFileError: Missing, unreadable, empty, corrupt, or too many pixels. The message names the file.
    """
    name = path.name if len(path.name) <= 80 else path.name[:77] + "..."
    try:
        if not path.exists():
            raise ImageFileError(f"{name}: image file does not exist")
        if not path.is_file():
            raise ImageFileError(f"{name}: not a regular file")
        data = path.read_bytes()
    except OSError as exc:
        raise ImageFileError(f"{name}: cannot read image: {exc.strerror or exc}") from exc
    if not data:
        raise ImageFileError(f"{name}: image file is empty (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()
    size = _check_image_bytes(data, name, max_pixels=max_pixels)
    return digest, size


def _check_image_bytes(data: bytes, name: str, *, max_pixels: int) -> tuple[int, int]:
    import io

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
        try:
            with PILImage.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageFileError(
                        f"{name}: {width}x{height} = {width * height:,} pixels exceeds the limit of {max_pixels:,} "
                        "(possible decompression bomb)"
                    )
                img.verify()
            with PILImage.open(io.BytesIO(data)) as img:
                img.load()  # verify() does not catch truncated pixel data
        except ImageFileError:
            raise
        except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
            raise ImageFileError(f"{name}: too many pixels (possible decompression bomb): {exc}") from exc
        except Exception as exc:
            raise ImageFileError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return width, height
