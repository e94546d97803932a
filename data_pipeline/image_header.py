"""The image size a JPEG header declares, read without a decoder (and without torch, for ``prepare``)."""

from __future__ import annotations

_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""JPEG start-of-frame markers (SOF0–SOF15 less DHT, JPG and DAC), whose segment holds the image size."""


def declared_jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) that the first frame header of the JPEG ``data`` (bytes, or anything with the buffer
    protocol: a NumPy uint8 array) declares, read by walking its marker segments: nothing is decoded or
    allocated.  None when ``data`` is not a JPEG or no frame header comes before the scan data."""
    view = memoryview(data).cast("B")
    end = len(view)
    if end < 4 or view[0] != 0xFF or view[1] != 0xD8:
        return None
    pos = 2
    while pos + 4 <= end:
        if view[pos] != 0xFF:
            return None
        marker = view[pos + 1]
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image, or the scan data: no frame header before it
            return None
        elif marker in _FRAME_MARKERS:
            if pos + 9 > end:
                return None
            return (view[pos + 5] << 8) | view[pos + 6], (view[pos + 7] << 8) | view[pos + 8]
        else:
            pos += 2 + ((view[pos + 2] << 8) | view[pos + 3])
    return None
