"""What admission reserves for an attachment (``providers.tokens``): an image by the size its header declares, read
without decoding the image, at the formula of the provider that may serve it; a PDF by its pages. Pure functions;
the images and PDFs are made in ``tests/attachments.py``."""

from __future__ import annotations

import asyncio
import base64
import threading
from fractions import Fraction
from types import SimpleNamespace

import pytest

from billing.models import Operation
from providers.tokens import (
    CLAUDE_PATCHES_MOST,
    EVERY_SERVER,
    IMAGE_TOKENS,
    IMAGE_TOKENS_MOST,
    PDF_ON_LOOP_CHARS_MOST,
    audio_duration,
    image_size,
    image_tokens_most,
    pdf_pages,
    pdf_tokens_most,
    prompt_token_bounds,
    prompt_token_bounds_async,
    prompt_tokens,
    served_by,
)
from tests.attachments import data_url, gif_header, jpeg_header, mp3, pdf, png, wav, webp_header


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def model(*deployments: tuple[str, str], context_window: int = 128_000) -> SimpleNamespace:
    """A ``ResolvedModel``'s shape as ``served_by`` reads it: each deployment's provider kind and upstream id."""
    return SimpleNamespace(
        context_window=context_window,
        deployments=tuple(
            SimpleNamespace(provider=SimpleNamespace(kind=kind), upstream_id=upstream) for kind, upstream in deployments
        ),
    )


def servers(kind: str, upstream_id: str, **kwargs) -> object:
    return served_by([model((kind, upstream_id), **kwargs)])


@pytest.mark.parametrize(
    ("image", "size"),
    [
        (png(3000, 2), (3000, 2)),
        (jpeg_header(4032, 3024), (4032, 3024)),
        # The frame header 70 KiB in, past two APP segments of EXIF and ICC data and a thumbnail's own frame header.
        (jpeg_header(1920, 1080, metadata_bytes=70_000), (1920, 1080)),
        (gif_header(640, 480), (640, 480)),
        (gif_header(10, 10, frame=(900, 700)), (900, 700)),  # a first frame larger than the screen
        (webp_header(1600, 1200, "VP8 "), (1600, 1200)),
        (webp_header(16383, 7, "VP8L"), (16383, 7)),
        (webp_header(5000, 9000, "VP8X"), (5000, 9000)),
    ],
)
def test_an_image_header_gives_its_size(image, size):
    assert image_size(b64(image)) == size


@pytest.mark.parametrize(
    "data",
    [
        b64(b"\x00\x00\x00 not an image at all"),
        b64(b"BM6\x00\x00\x00"),  # a BMP: a type whose header is not read
        b64(png(40, 30))[:20] + "\n" + b64(png(40, 30))[20:],  # a line break: offsets past it would be wrong
        b64(b"\xff\xd8" + b"\xff\xda\x00\x02" + b"\0" * 50),  # scan data before any frame header
        "%%%not base64%%%",
        "",
    ],
)
def test_a_header_that_does_not_read_gives_no_size(data):
    assert image_size(data) is None


def test_a_jpeg_whose_text_before_its_frame_header_is_not_plain_base64_gives_no_size():
    """The walk skips a segment's body undecoded: a line break in it (which a lenient decoder drops) would move the
    frame header from where the walk reads it, so the JPEG is reserved as one of unknown size."""
    text = b64(jpeg_header(1920, 1080, metadata_bytes=3_000))
    assert image_size(text) == (1920, 1080)
    assert image_size(text[:2_000] + "\n" + text[2_000:]) is None
    assert image_size(text[:2_000] + "-" + text[2_001:]) is None


def test_an_image_in_a_data_url_is_read_where_its_payload_starts():
    url = data_url(png(640, 480), "image/png")
    assert image_size(url, url.index(",") + 1) == (640, 480)


@pytest.mark.parametrize(
    ("kind", "upstream_id", "size", "detail", "tokens"),
    [
        # OpenAI's vision guide's own examples: 1024² high, 4 tiles: 85 + 4 × 170; 2048 × 4096 → 768 × 1536: 6 tiles.
        ("openai", "gpt-4o", (1024, 1024), "high", 765),
        ("openai", "gpt-4o-2024-08-06", (2048, 4096), "auto", 1105),
        ("azure_openai", "gpt-4.1", (4096, 8192), "low", 85),
        ("openai", "gpt-4o-mini", (2048, 2048), None, 2833 + 4 * 5667),
        ("openai", "o1", (512, 512), None, 75 + 150),
        # The patch-based: 1024² is 1,024 patches × 1.62 = 1,658.88, billed 1,659; past 1,536 patches, 1,536.
        ("openai", "gpt-4.1-mini", (1024, 1024), "low", 1659),
        ("openai", "gpt-5-nano", (1800, 2400), None, 3779),
        ("openai", "o4-mini", (32, 32), None, 2),
        # Claude: 1092² (its guide's 1:1 at ~1,590) by area; 2576 × 1449 by 28-px patches, capped.
        ("anthropic", "claude-sonnet-4-5", (1092, 1092), None, 1590),
        ("anthropic", "claude-opus-4-7", (2576, 1449), None, CLAUDE_PATCHES_MOST),
        # Gemini: a tile of 258 a side of at most 768, at least Gemini 3's 1,120 an image.
        ("gemini", "gemini-2.5-flash", (3840, 2160), None, 258 * 5 * 3),
        ("gemini", "gemini-2.5-flash", (200, 200), None, 1120),
    ],
)
def test_an_image_of_a_known_size_is_reserved_by_its_providers_formula(kind, upstream_id, size, detail, tokens):
    assert image_tokens_most(size, detail, servers(kind, upstream_id)) == tokens


@pytest.mark.parametrize(
    ("kind", "upstream_id", "detail", "tokens"),
    [
        ("openai", "gpt-4o", None, 85 + 8 * 170),  # 2048 × 768: 8 tiles, the most
        ("openai", "gpt-4o", "low", 85),
        ("openai", "gpt-4o-mini", None, IMAGE_TOKENS_MOST),
        ("openai", "my-fine-tune", None, IMAGE_TOKENS_MOST),  # an id of no known model: the dearest of OpenAI's
        ("anthropic", "claude-haiku-4-5", None, CLAUDE_PATCHES_MOST),
        ("vllm", "Qwen/Qwen2.5-VL-7B-Instruct", None, IMAGE_TOKENS_MOST),  # a formula not known: the dearest
    ],
)
def test_an_image_of_unknown_size_is_reserved_at_its_formulas_most(kind, upstream_id, detail, tokens):
    assert image_tokens_most(None, detail, servers(kind, upstream_id)) == tokens


def test_a_request_that_may_end_on_several_providers_reserves_the_dearest():
    either = served_by([model(("openai", "gpt-4o")), model(("anthropic", "claude-sonnet-4-5"))])
    assert image_tokens_most((1024, 1024), None, either) == max(765, 1399)  # 1024² / 750, Claude's the dearer


@pytest.mark.parametrize("object_stream", [False, True])
def test_a_pdfs_pages_are_counted_in_its_body_and_its_object_streams(object_stream):
    assert pdf_pages(pdf(37, object_stream=object_stream)) == 37


def test_a_pdf_whose_object_stream_does_not_inflate_has_no_count():
    """An encrypted PDF's object streams, or a damaged one's: its pages cannot be counted, and the PDF is reserved at
    the provider's page limit."""
    whole = pdf(5, object_stream=True)
    start = whole.index(b"stream\n", whole.index(b"/ObjStm")) + len(b"stream\n")
    assert pdf_pages(whole[:start] + b"\x00garbage" + whole[start + 8 :]) is None
    assert pdf_pages(b"%PDF-1.4 nothing here") is None


def test_a_pdf_is_reserved_per_page_up_to_the_providers_page_limit():
    claude = servers("anthropic", "claude-sonnet-4-5")
    assert pdf_tokens_most(3, claude) == 3 * (3_000 + CLAUDE_PATCHES_MOST)
    assert pdf_tokens_most(5_000, claude) == 600 * (3_000 + CLAUDE_PATCHES_MOST)  # Claude reads 600 at most
    assert pdf_tokens_most(None, servers("gemini", "gemini-2.5-pro")) == 1_000 * 560  # a URL or a file id: the limit
    assert pdf_tokens_most(2, servers("openai", "gpt-4o")) == 2 * (3_000 + 1445)


def chat(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": "Look at this"}, *parts]}]}


TEXT_ONLY = {"type": "text", "text": ""}


@pytest.mark.parametrize(
    ("body", "operation", "attached"),
    [
        (chat({"type": "image_url", "image_url": {"url": data_url(png(2048, 2048), "image/png")}}), "chat", 25501),
        (
            chat({"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}}),
            "chat",
            2833,  # gpt-4o-mini's low detail: its base
        ),
        (
            chat({"type": "file", "file": {"file_data": data_url(pdf(2), "application/pdf")}}),
            "chat",
            2 * (3000 + 48169),
        ),
        (chat({"type": "file", "file": {"file_data": b64(pdf(2)), "filename": "a.pdf"}}), "chat", 2 * (3000 + 48169)),
        (chat({"type": "file", "file": {"file_id": "file-abc"}}), "chat", 128_000),  # 100 pages: the window
        (chat({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}), "chat", IMAGE_TOKENS),
    ],
)
def test_a_chat_completions_attachment_is_reserved_at_its_formula(body, operation, attached):
    """Through gpt-4o-mini: each attachment's bound is the prompt's bound less its text's (the same body with
    the attachment's part text-free)."""
    mini = servers("openai", "gpt-4o-mini")
    text_alone = prompt_token_bounds(chat(TEXT_ONLY), operation=operation, servers=mini)[0]
    assert prompt_token_bounds(body, operation=operation, servers=mini)[0] - text_alone == attached


@pytest.mark.parametrize(
    ("block", "attached"),
    [
        (
            {
                "type": "image",
                "source": {"type": "base64", "media_type": "image/jpeg", "data": b64(jpeg_header(800, 600))},
            },
            640,
        ),
        ({"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}, CLAUDE_PATCHES_MOST),
        (
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": b64(pdf(9))}},
            9 * 7784,
        ),
        ({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "ab ç"}}, 5),
        ({"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}, 128_000),
    ],
)
def test_a_messages_attachment_is_reserved_at_claudes_formula(block, attached):
    claude = servers("anthropic", "claude-sonnet-4-5")
    text_alone = prompt_token_bounds(chat(TEXT_ONLY), operation=Operation.MESSAGES, servers=claude)[0]
    assert prompt_token_bounds(chat(block), operation=Operation.MESSAGES, servers=claude)[0] - text_alone == attached


def test_the_attachments_are_reserved_at_most_the_widest_context_window():
    """A provider refuses a prompt past its model's window (nothing billed): forty 30-page PDFs to a Claude of 200k
    reserve 200k, and a fallback with a wider window widens it."""
    body = chat(*[{"type": "file", "file": {"file_data": data_url(pdf(30), "application/pdf")}}] * 40)
    text_alone = prompt_token_bounds(chat(TEXT_ONLY), operation="chat")[0]
    narrow = served_by([model(("anthropic", "claude-sonnet-4-5"), context_window=200_000)])
    wide = served_by(
        [
            model(("anthropic", "claude-sonnet-4-5"), context_window=200_000),
            model(("gemini", "g"), context_window=1_000_000),
        ]
    )
    assert prompt_token_bounds(body, operation="chat", servers=narrow)[0] - text_alone == 200_000
    assert prompt_token_bounds(body, operation="chat", servers=wide)[0] - text_alone == 1_000_000


GUARDED = {
    "plain": ("chat", {"messages": [{"role": "user", "content": "Hello there, how are you?"}]}, (37, 10)),
    "system, tools and wide characters": (
        "messages",
        {
            "system": [{"type": "text", "text": "You are terse. Ñandú 你好"}],
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is 2 + 2? 🙂"}]},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "t1", "name": "calc", "input": {"expr": "2+2"}}],
                },
            ],
            "tools": [{"name": "calc", "input_schema": {"type": "object"}}],
        },
        (97, 36),
    ),
}


@pytest.mark.parametrize("name", GUARDED)
@pytest.mark.parametrize(
    "served", [None, ("openai", "gpt-4o-mini"), ("anthropic", "claude-opus-4-7"), ("ollama", "llama3.2")]
)
def test_a_text_request_is_bounded_and_estimated_as_before(name, served):
    """The bound and the estimate of a request without attachments, pinned at what 8054b03 (before attachments were
    measured) gave, whoever serves it."""
    operation, body, before = GUARDED[name]
    chosen = servers(*served) if served else None
    assert prompt_token_bounds(body, operation=operation, servers=chosen) == before


def test_settlements_estimate_of_an_attachment_is_unchanged():
    """Settlement, when the provider counted nothing, still charges an attachment ``IMAGE_TOKENS``, measured or not."""
    big = chat({"type": "image_url", "image_url": {"url": data_url(png(2048, 2048), "image/png")}})
    assert prompt_tokens(big, operation="chat") - prompt_tokens(chat(TEXT_ONLY), operation="chat") == IMAGE_TOKENS
    assert EVERY_SERVER.context_window is None


# A 40-page PDF of 300 KB (an embedded image's bytes): its base64, 400,000 characters, past what is counted on the loop.
LARGE_PDF = pdf(40, padding=300_000)
LARGE_FILE = {"type": "file", "file": {"file_data": data_url(LARGE_PDF, "application/pdf")}}
LARGE_DOCUMENT = {
    "type": "document",
    "source": {"type": "base64", "media_type": "application/pdf", "data": b64(LARGE_PDF)},
}
SMALL_FILE = {"type": "file", "file": {"file_data": b64(pdf(3)), "filename": "a.pdf"}}
LARGE_NOT_PDF = {"type": "file", "file": {"file_data": b64(bytes(400_000)), "filename": "zeros.bin"}}
LARGE_IN_CONTENT = {"type": "document", "source": {"type": "content", "content": [LARGE_DOCUMENT]}}


@pytest.mark.parametrize(
    ("operation", "parts"),
    [
        ("chat", [LARGE_FILE]),
        ("chat", [LARGE_FILE, SMALL_FILE, LARGE_NOT_PDF, LARGE_FILE]),
        ("messages", [LARGE_DOCUMENT, LARGE_IN_CONTENT]),
        ("chat", [SMALL_FILE]),
    ],
    ids=["one-large", "large-small-not-a-pdf", "messages-document-and-content", "small"],
)
@pytest.mark.parametrize(
    "served", [None, ("anthropic", "claude-sonnet-4-5"), ("openai", "gpt-4o-mini"), ("gemini", "gemini-2.5-pro")]
)
def test_admissions_bound_of_a_large_pdf_is_the_same_counted_off_the_loop(operation, parts, served, pdf_counts):
    """``prompt_token_bounds_async`` (admission, on the event loop) gives the figures ``prompt_token_bounds`` gives,
    a large PDF's pages counted in a thread: 40 pages, not the provider's page limit."""
    assert len(LARGE_FILE["file"]["file_data"]) > PDF_ON_LOOP_CHARS_MOST > len(SMALL_FILE["file"]["file_data"])
    chosen = servers(*served) if served else None
    body = chat(*parts)
    expected = prompt_token_bounds(body, operation=operation, servers=chosen)

    assert asyncio.run(prompt_token_bounds_async(body, operation=operation, servers=chosen)) == expected
    assert {count.pages for count in pdf_counts} <= {40, 3}


def test_a_large_pdf_is_counted_in_a_thread_and_a_small_one_on_the_loop(pdf_counts):
    """The loop runs in this thread (``asyncio.run``): the two large PDFs are counted in another, where no loop runs;
    the small one (a few µs) on the loop."""
    asyncio.run(prompt_token_bounds_async(chat(LARGE_FILE, SMALL_FILE, LARGE_DOCUMENT), operation="chat"))

    loop_thread = threading.get_ident()
    assert sorted((count.pages, count.thread == loop_thread, count.on_loop) for count in pdf_counts) == [
        (3, True, True),
        (40, False, False),
        (40, False, False),
    ]


def test_settlements_estimate_reads_no_pdf(pdf_counts):
    """The estimate counts an attachment ``IMAGE_TOKENS`` whatever it holds: it decodes no PDF (settlement runs it on
    the event loop)."""
    body = chat(LARGE_FILE, SMALL_FILE)
    assert prompt_tokens(body, operation="chat") == prompt_token_bounds(body, operation="chat")[1]
    pdf_counts.clear()
    assert prompt_tokens(body, operation="chat") - prompt_tokens(chat(TEXT_ONLY), operation="chat") == 2 * IMAGE_TOKENS
    assert pdf_counts == []


@pytest.mark.parametrize(
    ("sound", "seconds"),
    [
        (wav(2.5), Fraction(5, 2)),  # 16 kHz mono, 16 bits
        (wav(1, rate=44_100, channels=2), Fraction(1)),
        (wav(3, rate=8_000, bits=8, metadata=1_001), Fraction(3)),  # a LIST chunk (odd: padded) before the data
        (wav(2, declared=0xFFFFFFFF), Fraction(2)),  # streamed: the bytes the text holds
        (wav(2, declared=16_000), Fraction(1, 2)),  # the data chunk's own size, less than the text holds
        (mp3(250), Fraction(6)),  # 128 kbit/s at 48 kHz: 384-byte frames of 1,152 samples, 24 ms each
        (mp3(250, id3=1_000), Fraction(6)),  # past an ID3v2 tag
        (mp3(100, version=2, kbps=64, rate=24_000, mono=True), Fraction(12, 5)),  # MPEG-2: 576 samples a frame
        (mp3(10, version=25, kbps=8, rate=8_000), Fraction(18, 25)),  # MPEG-2.5: 72-byte frames of 72 ms
        # A variable bitrate: its Xing (or VBRI) header counts 1,000 frames (24 s), more than its bytes at the first
        # frame's bitrate (250 ms); the longer is taken.
        (mp3(10, kbps=128, xing_frames=1_000), Fraction(24)),
        (mp3(10, kbps=128, mono=True, xing_frames=1_000), Fraction(24)),
        (mp3(10, kbps=128, vbri_frames=1_000), Fraction(24)),
        (mp3(250, kbps=128, xing_frames=5), Fraction(6)),  # a header counting fewer frames than the bytes hold
    ],
)
def test_a_sounds_duration_is_read_from_its_header(sound, seconds):
    assert audio_duration(b64(sound)) == seconds


@pytest.mark.parametrize(
    "sound",
    [
        b"not a sound at all",
        wav(1)[:30],  # cut before its data chunk
        wav(1).replace(b"\x01\x00\x01\x00", b"\x55\x00\x01\x00", 1),  # MP3 inside a WAV: no framed byte rate
        mp3(10)[:3],
        b"\xff\xfd" + mp3(10)[2:],  # layer II
        mp3(10)[:2] + b"\xf0" + mp3(10)[3:],  # a bad bitrate index
    ],
)
def test_a_sound_whose_header_does_not_read_has_no_duration(sound):
    assert audio_duration(b64(sound)) is None


def audio(sound: bytes, audio_format: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": b64(sound), "format": audio_format}}


@pytest.mark.parametrize(
    ("part", "served", "attached"),
    [
        (audio(wav(2.5)), ("openai", "gpt-4o-audio-preview"), 25),  # 10 tokens a second
        (audio(wav(2.5)), ("gemini", "gemini-2.5-flash"), 80),  # 32
        (audio(wav(2.5)), None, 80),  # no model known: the dearest
        (audio(wav(2.5)), ("anthropic", "claude-sonnet-4-5"), 80),  # Claude documents none: the dearest
        (audio(wav(2.5)), ("openrouter", "openai/gpt-4o-audio-preview"), 80),  # a kind whose formula is not known
        (audio(mp3(250), "mp3"), ("openai", "gpt-4o-audio-preview"), 60),
        (audio(mp3(10, xing_frames=1_000), "mp3"), ("gemini", "gemini-2.5-flash"), 768),
        (audio(wav(0.01)), ("openai", "gpt-4o-audio-preview"), 1),  # a tenth of a token: one
        (audio(b"RIFF...."), ("gemini", "gemini-2.5-flash"), IMAGE_TOKENS),  # unreadable: as before
        ({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "mp3"}}, None, IMAGE_TOKENS),
    ],
)
def test_a_sound_is_reserved_its_duration_at_its_providers_rate(part, served, attached):
    """Before, any sound was reserved 1,600 tokens: 50 s of it to Gemini (1,600 tokens) and anything longer went
    through on a budget for less. The bound less the text's (the same body with the sound's part text-free)."""
    chosen = servers(*served) if served else None
    text_alone = prompt_token_bounds(chat(TEXT_ONLY), operation="chat", servers=chosen)[0]
    assert prompt_token_bounds(chat(part), operation="chat", servers=chosen)[0] - text_alone == attached


def test_a_long_sound_is_reserved_at_most_the_widest_context_window():
    """Ten minutes to Gemini (19,200 tokens) through a model of a 16,000-token window: 16,000, as images and PDFs."""
    narrow = served_by([model(("gemini", "gemini-2.5-flash"), context_window=16_000)])
    text_alone = prompt_token_bounds(chat(TEXT_ONLY), operation="chat", servers=narrow)[0]
    body = chat(audio(wav(600, rate=8_000, bits=8)))
    assert prompt_token_bounds(body, operation="chat", servers=narrow)[0] - text_alone == 16_000
    wide = served_by([model(("gemini", "gemini-2.5-flash"), context_window=1_000_000)])
    assert prompt_token_bounds(body, operation="chat", servers=wide)[0] - text_alone == 19_200
    assert prompt_tokens(body, operation="chat") - prompt_tokens(chat(TEXT_ONLY), operation="chat") == IMAGE_TOKENS
