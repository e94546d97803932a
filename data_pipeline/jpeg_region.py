"""Decode only the rectangle of a JPEG that a random-resized crop keeps (C: ``_jpeg_region.c``).

A training crop covers about half of an image on average, and decoding is about half of a sample's cost;
decoding the rectangle alone (no inverse DCT for the rows above it and the columns beside it; the rows below
it entropy-decoded only, to read the file to its end, so that damage anywhere fails as in a full decode)
gives the same pixels as decoding everything and slicing.  ``DecodeResizedCrop`` does
torchvision's RandomResizedCrop that way: the crop is drawn from the image size in the header, with the
same random draws as ``v2.RandomResizedCrop`` on the decoded image, so the output is the same tensor.

Files the region decoder does not take (CMYK, or corrupt data libjpeg would warn about and paper over)
and installs without the compiled helper go through ``torchvision.io.decode_jpeg`` and a slice instead:
same output, full cost, and decode_jpeg's own errors.

A decoder sizes its buffers by the image size the header declares, not by the file: a 4 KB file declaring
20000×20000 pixels costs gigabytes.  Every path here reads the declared size first and refuses
(``OversizedImage``, a kind of ``UndecodableImage``: the sample is skipped) an image of more than
``max_pixels`` pixels (``data.max_image_pixels``) before anything is decoded; the C decoder checks it too.
"""

from __future__ import annotations

import ctypes

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import v2

from data_pipeline.config import MAX_IMAGE_PIXELS
from data_pipeline.image_header import declared_jpeg_size


class UndecodableImage(ValueError):
    """The bytes are not an image ``torchvision.io.decode_jpeg`` can decode."""


class OversizedImage(UndecodableImage):
    """The header declares more pixels than the bound; nothing was decoded."""


_REGION_TOO_LARGE = -5
"""``jpeg_region_decode``'s status for a header over its ``max_pixels``."""


def declared_size(data: torch.Tensor | bytes) -> tuple[int, int] | None:
    """(height, width) that the JPEG header in ``data`` declares (``declared_jpeg_size``: nothing decoded)."""
    return declared_jpeg_size(data.numpy() if isinstance(data, torch.Tensor) else data)


def _oversized(height: int, width: int, max_pixels: int) -> OversizedImage:
    return OversizedImage(
        f"its header declares {width}x{height} pixels, more than data.max_image_pixels ({max_pixels:,}); not decoded"
    )


def check_declared_size(data: torch.Tensor | bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """``OversizedImage`` when ``data``'s header declares more than ``max_pixels`` pixels."""
    size = declared_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise _oversized(*size, max_pixels)


def _load_library() -> ctypes.CDLL | None:
    try:
        from data_pipeline import _jpeg_region
    except ImportError:  # installed without building the extension (no C compiler or libjpeg headers)
        return None
    library = ctypes.CDLL(_jpeg_region.__file__)
    pointer, size, coordinate = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int32
    library.jpeg_region_image_size.argtypes = [pointer, size, pointer]
    library.jpeg_region_image_size.restype = ctypes.c_int
    library.jpeg_region_buffer_bytes.argtypes = [coordinate] * 3
    library.jpeg_region_buffer_bytes.restype = size
    library.jpeg_region_decode.argtypes = [pointer, size, pointer, size, *[coordinate] * 5, size]
    library.jpeg_region_decode.restype = ctypes.c_int
    return library


_LIBRARY = _load_library()
_WIDTH_UNKNOWN = 1 << 30
"""The image width to size a buffer by when it is not known (the bound then depends on the rectangle only)."""
_DECODE = _LIBRARY.jpeg_region_decode if _LIBRARY is not None else None


def available() -> bool:
    """Whether the compiled region decoder is installed (``pip install -e .`` builds it)."""
    return _LIBRARY is not None


def image_size(data: torch.Tensor) -> tuple[int, int] | None:
    """(height, width) from the JPEG header in ``data`` (1-D uint8, contiguous), or None when the region
    decoder cannot read it."""
    if _LIBRARY is None:
        return None
    size = torch.empty(2, dtype=torch.int32)
    if _LIBRARY.jpeg_region_image_size(data.data_ptr(), data.numel(), size.data_ptr()) != 0:
        return None
    height, width = size.tolist()
    return height, width


def decode_region(
    data: torch.Tensor, top: int, left: int, height: int, width: int, max_pixels: int = MAX_IMAGE_PIXELS
) -> torch.Tensor | None:
    """RGB uint8 pixels of rows ``[top, top + height)`` and columns ``[left, left + width)`` as a (3, height,
    width) tensor laid out like ``decode_jpeg``'s output (channels last in memory), or None when the region
    decoder cannot decode this file (or the rectangle is not inside the image); ``OversizedImage`` when the
    header declares more than ``max_pixels`` pixels."""
    if _LIBRARY is None:
        return None
    capacity = _LIBRARY.jpeg_region_buffer_bytes(height, width, _WIDTH_UNKNOWN)
    buffer = torch.empty(capacity, dtype=torch.uint8)
    status = _DECODE(
        data.data_ptr(), data.numel(), buffer.data_ptr(), capacity, top, left, height, width, 0, max_pixels
    )
    if status == _REGION_TOO_LARGE:
        raise _oversized(*(image_size(data) or (0, 0)), max_pixels)
    if status != 0:
        return None
    return buffer[: height * width * 3].view(height, width, 3).permute(2, 0, 1)


def decode_region_into(source, destination, top, left, height, width, max_pixels):
    """FFCV's flavour, compiled by numba inside FFCV's pipeline: the rectangle's pixels, decoded with the fast
    inverse DCT as FFCV's own decoder does, into the first ``height * width * 3`` bytes of ``destination``
    (NumPy uint8; the whole of it is scratch space).  Returns 0, or non-zero when the caller must decode the
    whole image instead (or when the extension is not installed: see ``region_decoder_for_numba``); -5 when
    the header declares more than ``max_pixels`` pixels."""
    return _DECODE(
        source.ctypes.data,
        source.size,
        destination.ctypes.data,
        destination.size,
        top,
        left,
        height,
        width,
        1,
        max_pixels,
    )


def _no_region_decoder(source, destination, top, left, height, width, max_pixels):
    return -1


def region_decoder_for_numba():
    """``decode_region_into``, or a stand-in that always asks for the full decode when the extension is
    missing (numba cannot compile a call to a library that is not there)."""
    return decode_region_into if _DECODE is not None else _no_region_decoder


def decode_rgb(data: torch.Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """The whole image, (3, H, W) uint8; ``UndecodableImage`` if it is not one, ``OversizedImage`` (before
    decoding) if its header declares more than ``max_pixels`` pixels."""
    check_declared_size(data, max_pixels)
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise UndecodableImage(str(exc).splitlines()[0][:200]) from exc


class DecodeResizedCrop:
    """JPEG bytes → ``crop`` (a ``v2.RandomResizedCrop``) of the decoded image, decoding only the crop."""

    def __init__(self, crop: v2.RandomResizedCrop, max_pixels: int = MAX_IMAGE_PIXELS):
        self.crop = crop
        self.max_pixels = max_pixels
        """Images whose header declares more pixels are refused (``OversizedImage``) before decoding."""

    def draw(self, size: tuple[int, int]) -> dict:
        """The crop's parameters as the transform draws them for an image of ``size`` (from torch's RNG; a
        0-channel stand-in for the image, no pixels)."""
        return self.crop.make_params([torch.empty(0, *size, dtype=torch.uint8)])

    def __call__(self, data: torch.Tensor) -> torch.Tensor:
        size = image_size(data)
        if size is None:
            return self.crop(decode_rgb(data, self.max_pixels))
        if size[0] * size[1] > self.max_pixels:
            raise _oversized(*size, self.max_pixels)
        params = self.draw(size)
        top, left, height, width = params["top"], params["left"], params["height"], params["width"]
        region = decode_region(data, top, left, height, width, self.max_pixels)
        if region is None:
            region = decode_rgb(data, self.max_pixels)[:, top : top + height, left : left + width]
        # The transform's own kernel on the cropped pixels (its dispatch costs a worker ~5 % of its time).
        return v2.functional.resize_image(
            region, self.crop.size, interpolation=self.crop.interpolation, antialias=self.crop.antialias
        )

    def __repr__(self) -> str:
        return f"DecodeResizedCrop({self.crop!r})"
