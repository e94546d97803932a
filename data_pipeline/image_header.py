"""The image size a JPEG header declares, read without a decoder (and without torch, for ``prepare``)."""

from __future__ import annotations

_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""JPEG start-of-frame markers (SOF0–SOF15 less DHT, JPG and DAC), whose segment holds the image size."""


def declared_jpeg_size(data) -> tuple[int, int] | None:
    """(height, width) that the first frame header of the JPEG ``data`` (bytes, or anything with the buffer
    protocol: a NumPy uint8 array) declares, found as libjpeg finds it: marker segments are walked by their
    lengths, and bytes that are no marker are skipped (libjpeg skips them with a warning and decodes on).
    Nothing is decoded or allocated beyond a copy of the bytes.  None when ``data`` is not a JPEG or no frame
    header comes before the scan data."""
    data = bytes(data)
    end = len(data)
    if end < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)  # a marker's first byte; anything before it is garbage
        while 0 <= pos < end - 1 and data[pos + 1] == 0xFF:  # fill bytes
            pos += 1
        if pos < 0 or pos + 4 > end:
            return None
        marker = data[pos + 1]
        if marker == 0 or marker == 0x01 or 0xD0 <= marker <= 0xD7:  # a stuffed zero, or no segment
            pos += 2
        elif marker in (0xD9, 0xDA):  # end of image, or the scan data: no frame header before it
            return None
        elif marker in _FRAME_MARKERS:
            if pos + 9 > end:
                return None
            return (data[pos + 5] << 8) | data[pos + 6], (data[pos + 7] << 8) | data[pos + 8]
        else:
            pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
