"""Images and PDFs made byte by byte for the tests of what an attachment is reserved (``providers.tokens``): a real
PNG (any decoder reads it), the headers of the other image types as their specifications lay them out, and PDFs of
N pages, their page objects in the body or in a compressed object stream; and ``pdf_counts``, a fixture that watches
which thread counts a PDF's pages."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import wave
import zlib
from typing import NamedTuple

import pytest

from providers import tokens


class PdfCount(NamedTuple):
    """A PDF's pages counted (``pdf_counts``): how many, the thread's ``threading.get_ident()``, and whether an event
    loop was running in it."""

    pages: int | None
    thread: int
    on_loop: bool


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int) -> bytes:
    """A whole greyscale PNG of that size, all black (it compresses to a few KiB)."""
    rows = (b"\0" + b"\0" * width) * height
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )


def _jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes((0xFF, marker)) + struct.pack(">H", len(body) + 2) + body


def jpeg_header(width: int, height: int, *, metadata_bytes: int = 0) -> bytes:
    """A JPEG's segments up to its frame header (SOF0), after an APP0 and an APP1 of ``metadata_bytes`` holding a
    thumbnail's own frame header of 160 × 120 (an EXIF thumbnail's): the walk must skip it."""
    thumbnail = b"\xff\xd8" + _jpeg_segment(0xC0, b"\x08" + struct.pack(">HH", 120, 160) + b"\x01\x01\x11\x00")
    exif = b"Exif\0\0" + thumbnail + b"\0" * metadata_bytes
    frame = b"\x08" + struct.pack(">HH", height, width) + b"\x03" + b"\x01\x22\x00\x02\x11\x01\x03\x11\x01"
    return (
        b"\xff\xd8"
        + _jpeg_segment(0xE0, b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0")
        + _jpeg_segment(0xE1, exif[:65000])
        + b"".join(_jpeg_segment(0xE2, exif[start : start + 65000]) for start in range(65000, len(exif), 65000))
        + _jpeg_segment(0xDB, b"\0" + bytes(range(64)))
        + b"\xff"  # a fill byte before the marker
        + _jpeg_segment(0xC2, frame)  # progressive
        + b"\xff\xd9"
    )


def gif_header(width: int, height: int, *, frame: tuple[int, int] | None = None) -> bytes:
    """A GIF's screen of that size, a global colour table, a graphic control extension and the first frame's
    descriptor (``frame``: its size, the screen's by default)."""
    frame_width, frame_height = frame or (width, height)
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", width, height, 0x81, 0, 0)  # a global colour table of 4 entries
        + b"\0" * 12
        + b"\x21\xf9\x04\x00\x00\x00\x00\x00"
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, frame_width, frame_height, 0)
        + b"\x02\x02\x44\x01\x00\x3b"
    )


def webp_header(width: int, height: int, chunk: str) -> bytes:
    """A WebP's RIFF header and its first chunk, ``VP8 `` (lossy), ``VP8L`` (lossless) or ``VP8X`` (extended)."""
    if chunk == "VP8 ":
        body = b"\x10\x02\x00" + b"\x9d\x01\x2a" + struct.pack("<HH", width, height) + b"\0" * 10
    elif chunk == "VP8L":
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little") + b"\0" * 10
    else:
        body = b"\x10\0\0\0" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return (
        b"RIFF" + struct.pack("<I", 4 + 8 + len(body)) + b"WEBP" + chunk.encode() + struct.pack("<I", len(body)) + body
    )


def pdf(pages: int, *, object_stream: bool = False, padding: int = 0) -> bytes:
    """A PDF of ``pages`` pages, each a line of text. ``object_stream``: its page objects and page tree in a
    Flate-compressed object stream (PDF 1.5), where a scan of the file's bytes does not see them. ``padding``: that
    many bytes more, in a stream object of binary data none of whose bytes spell a name (an embedded image's)."""
    page_ids = range(4, 4 + pages)
    objects = {
        1: b"<< /Type /Catalog /Pages 2 0 R >>",
        2: b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % n for n in page_ids) + b"] /Count %d >>" % pages,
        3: b"<< /Length 44 >>\nstream\nBT /F1 12 Tf 72 720 Td (A page of text) Tj ET\nendstream",
    }
    for number in page_ids:
        objects[number] = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 3 0 R >>"
    body = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    if object_stream:
        packed = [number for number in objects if number != 3]
        texts = [objects[number] for number in packed]
        offsets, position = [], 0
        for number, text in zip(packed, texts, strict=True):
            offsets.append(b"%d %d" % (number, position))
            position += len(text) + 1
        header = b" ".join(offsets) + b" "
        stream = zlib.compress(header + b" ".join(texts))
        body += b"3 0 obj\n" + objects[3] + b"\nendobj\n"
        body += (
            b"%d 0 obj\n<< /Type /ObjStm /N %d /First %d /Filter /FlateDecode /Length %d >>\nstream\n"
            % (4 + pages, len(packed), len(header), len(stream))
            + stream
            + b"\nendstream\nendobj\n"
        )
    else:
        for number, text in objects.items():
            body += b"%d 0 obj\n" % number + text + b"\nendobj\n"
    if padding:
        data = (bytes(range(128, 256)) * (padding // 128 + 1))[:padding]
        body += b"%d 0 obj\n<< /Length %d >>\nstream\n" % (5 + pages, padding) + data + b"\nendstream\nendobj\n"
    return body + b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"


def wav(
    seconds: float,
    *,
    rate: int = 16_000,
    channels: int = 1,
    bits: int = 16,
    declared: int | None = None,
    metadata: int = 0,
) -> bytes:
    """A PCM WAV of ``seconds`` of silence, as the ``wave`` module writes it; ``declared``: the data chunk's size
    replaced by this (0xFFFFFFFF: a recorder that streamed it); ``metadata``: a LIST chunk of that many bytes before
    the data chunk (and its pad byte, when odd)."""
    frames = round(seconds * rate)
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(channels)
        writer.setsampwidth(bits // 8)
        writer.setframerate(rate)
        writer.writeframes(bytes(frames * channels * bits // 8))
    data = out.getvalue()
    at = data.index(b"data")
    if declared is not None:
        data = data[: at + 4] + struct.pack("<I", declared) + data[at + 8 :]
    if metadata:
        data = data[:at] + b"LIST" + struct.pack("<I", metadata) + bytes(metadata + metadata % 2) + data[at:]
    return data


# MPEG audio layer III frame headers' second byte (sync, version, layer III, no CRC) by version.
_MP3_VERSION_BYTE = {1: 0xFB, 2: 0xF3, 25: 0xE3}
_MP3_KBPS_INDEX = {1: {32: 1, 64: 5, 128: 9, 320: 14}, 2: {8: 1, 64: 8, 160: 14}, 25: {8: 1, 64: 8, 160: 14}}
_MP3_RATE_INDEX = {
    1: {44100: 0, 48000: 1, 32000: 2},
    2: {22050: 0, 24000: 1, 16000: 2},
    25: {11025: 0, 12000: 1, 8000: 2},
}


def mp3(
    frames: int,
    *,
    version: int = 1,
    kbps: int = 128,
    rate: int = 48_000,
    mono: bool = False,
    xing_frames: int | None = None,
    vbri_frames: int | None = None,
    id3: int = 0,
) -> bytes:
    """An MP3 of ``frames`` frames of layer III (MPEG ``version`` 1, 2 or 25 for 2.5), silent, each frame its header
    and zeros (no padding: choose a rate the bitrate divides, 48 kHz at 128 kbit/s, for frames of equal length).
    ``xing_frames`` or ``vbri_frames``: the first frame carries a Xing (or Fraunhofer VBRI) header with that frame
    count; ``id3``: an ID3v2 tag of that many bytes before the first frame."""
    header = bytes(
        [
            0xFF,
            _MP3_VERSION_BYTE[version],
            _MP3_KBPS_INDEX[version][kbps] << 4 | _MP3_RATE_INDEX[version][rate] << 2,
            (3 if mono else 0) << 6,
        ]
    )
    length = (144_000 if version == 1 else 72_000) * kbps // rate
    frame = header + bytes(length - 4)
    first = frame
    if xing_frames is not None:
        side_info = (17 if mono else 32) if version == 1 else (9 if mono else 17)
        tag = b"Xing" + struct.pack(">II", 1, xing_frames)
        first = header + bytes(side_info) + tag + bytes(length - 4 - side_info - len(tag))
    if vbri_frames is not None:
        tag = b"VBRI" + struct.pack(">HHHII", 1, 0, 75, length * frames, vbri_frames)
        first = header + bytes(32) + tag + bytes(length - 36 - len(tag))
    tag = b""
    if id3:
        size = id3 - 10
        syncsafe = bytes([(size >> 21) & 0x7F, (size >> 14) & 0x7F, (size >> 7) & 0x7F, size & 0x7F])
        tag = b"ID3\x04\x00\x00" + syncsafe + bytes(size)
    return tag + first + frame * (frames - 1)


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


@pytest.fixture
def pdf_counts(monkeypatch) -> list[PdfCount]:
    """Each count of a PDF's pages (``providers.tokens.pdf_pages``), with the thread that counted it."""
    counts: list[PdfCount] = []
    count = tokens.pdf_pages

    def watched(data: bytes) -> int | None:
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        pages = count(data)
        counts.append(PdfCount(pages, threading.get_ident(), on_loop))
        return pages

    monkeypatch.setattr(tokens, "pdf_pages", watched)
    return counts
