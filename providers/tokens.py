"""The one token estimator: what a request's prompt, or the text relayed to a client, comes to in tokens
when no provider has counted them.

Two modes over the same walk of a body (a chat completion, an Anthropic Messages request, a text completion, an
embeddings request), so that what admission reserves and what settlement charges look at the same parts:

- ``upper_bound``: before the call, for reservations and tokens-per-minute windows. ASCII text at half its
  characters: real tokenizers average about four characters a token on English and rarely fall below two. Any
  other character at its UTF-8 bytes: a byte-level BPE (OpenAI's cl100k and o200k, Llama 3's, Qwen's, Mistral's
  Tekken) makes at most one token of each byte, and so does a SentencePiece's byte fallback (Llama 2's, Mistral
  7B's) for a character its vocabulary lacks. Half the characters is no bound there: cl100k makes one or two
  tokens of a common CJK character, up to three (its bytes) of a rare one and of most Ethiopic, Myanmar or Tibetan
  characters, up to three of an emoji's four bytes. Bytes reserve common CJK text (about one token a character
  in o200k, Qwen's or Llama 3's) about three times what it is billed, as half the characters reserves English
  about twice: alike slack, given back at settlement. Plus the per-message framing, each attachment at the most its
  providers may bill it (an image by the size its header declares, a PDF by its pages, a sound by its duration:
  ``_attachment_most``, ``docs/ledger.md``, "What an attachment pays") and a little overhead.
- estimate (the default): at settlement, when the provider sent no usage (a stream cut short, a client
  gone, an upstream that reports none): ASCII text at about four characters a token; any other character at
  half a token for each of its UTF-8 bytes past the first: a Cyrillic, Greek, Hebrew or Arabic letter (two bytes)
  half a token, a CJK, kana, Hangul, Thai or Devanagari character (three) one, an emoji (four) one and a half,
  about what those tokenizers bill on average (a quarter of a token a character charged a CJK reply a quarter of
  it). Plus a few tokens of framing a message and Anthropic's own estimate for a mid-sized image. The ledger row
  says it is an estimate.

Both weigh a text from C-speed ``str`` operations (``isascii``, which CPython answers without reading the text,
and two ``encode`` calls for any other), never a Python loop over its characters: this runs on every request's path.

A token array (embeddings' pre-tokenized input) is counted exactly in both modes. An embeddings input's text, whose
tokens are all a request costs, is bounded by its UTF-8 bytes (``EMBEDDING_INPUT_OVERHEAD`` more an input): a true
bound for the tokenizers embedding providers use, where two characters a token is not (below).

Providers holds it, below billing and chat, so that every side counts a prompt alike: admission before the
call and settlement after (billing), ``count_tokens`` and the cost calculator (``/api/cost/estimate``), and a
translated stream's ``message_start`` (``providers.adapters.base``), which a stream cut midway is charged.
"""

from __future__ import annotations

import asyncio
import binascii
import json
import math
import re
import struct
import zlib
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

CHARS_PER_TOKEN = 4  # an estimate: English averages about four characters a token
UPPER_CHARS_PER_TOKEN = 2  # a bound for ASCII text: tokenizers rarely fall below two characters a token
# An estimate for any other character: a token for every two of its UTF-8 bytes past the first (one a CJK character).
EXTRA_BYTES_PER_TOKEN = 2
# Anthropic's estimate for a mid-sized image: what settlement's estimate counts an attachment of every kind, and what
# the bound counts a sound (an image or a document is bounded by its provider's formula: ``_attachment_most``).
IMAGE_TOKENS = 1_600
MESSAGE_FRAMING = 3  # the role and separators each message adds, as providers count them
UPPER_MESSAGE_FRAMING = 8
UPPER_OVERHEAD = 16  # the reply's priming, for the bound
# A byte-level BPE (OpenAI's, Mistral's, Cohere's, Llama 3's and Qwen's) makes at most one token of each UTF-8 byte;
# a SentencePiece with byte fallback (Gemini's, XLM-R's) or a WordPiece (BERT's) at most one of each character, plus
# its word-start marker. Either may add its special tokens (BOS and EOS, [CLS] and [SEP]) to each input. So bytes,
# plus this much an input, bound what any of them counts; two characters a token does not: an emoji is one
# character of 4 bytes that tiktoken (cl100k) splits into up to 3 tokens, a rare CJK character up to 3 of 3 bytes.
EMBEDDING_INPUT_OVERHEAD = 4
_ATTACHMENTS = frozenset({"image", "image_url", "input_audio", "file", "document"})
# The Messages API's blocks that call a tool, whose ``input`` the model wrote: the client's tool, a server tool
# Anthropic runs (web search, code execution) or an MCP server's tool (the MCP connector).
TOOL_CALL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})
# The searches reserved for a web search tool without ``max_uses`` (Anthropic sets no limit of its own; a turn
# rarely runs more): a bound, not a guarantee, which the settle step corrects to what ran.
WEB_SEARCHES_UNBOUNDED = 10
EMBEDDINGS = "embeddings"  # the operation (``billing.models.Operation``) whose body is an ``input``, not messages
COMPLETIONS = "completions"  # the operation of a text completion: its body's ``prompt`` and ``suffix``, not messages
# Where a chat completion's assistant turn holds a reasoning model's reasoning, which its servers take back
# (DeepSeek's thinking mode asks for its reasoning_content again in a tool-call round; OpenRouter takes reasoning).
REASONING_FIELDS = ("reasoning_content", "reasoning")
# The most tokens a provider's count may say and be believed: what a ledger row's count holds
# (``PositiveIntegerField``, PostgreSQL's ``integer``). More is nonsense, and the database would refuse the row.
COUNT_MAX = 2**31 - 1


def thinking_block_texts(message: Mapping[str, Any]) -> list[tuple[int, str]]:
    """(position, text) of each ``thinking`` block in a chat completion's assistant turn's ``thinking_blocks``: Claude's
    thinking as the replies give it and a tool-use round sends it back (a ``redacted_thinking`` block is encrypted:
    no text)."""
    blocks = message.get("thinking_blocks")
    return [
        (number, block["thinking"])
        for number, block in enumerate(blocks if isinstance(blocks, list) else ())
        if isinstance(block, Mapping) and block.get("type") == "thinking" and isinstance(block.get("thinking"), str)
    ]


# The upstream ids of OpenAI's search models (its models page and web search guide: gpt-4o-search-preview,
# gpt-4o-mini-search-preview and gpt-5-search-api, each also under a dated snapshot's id, ``-2025-03-11``), which
# search the web before every chat completion, asked or not; behind a router under a vendor's prefix too
# (OpenRouter's ``openai/gpt-4o-search-preview``). An Azure deployment's name is its own: its admin says so.
_OPENAI_SEARCH_MODEL = re.compile(
    r"(?:^|/)gpt-[a-z0-9.-]*?-search-(?:preview|api)(?:-\d{4}-\d{2}-\d{2})?$", re.IGNORECASE
)


def upstream_searches_every_request(upstream_id: str) -> bool:
    """Whether ``upstream_id`` names one of OpenAI's search models, which search the web before every answer (and bill
    the search per call), ``web_search_options`` or not: what a deployment's ``searches_every_request`` left to the
    upstream id decides."""
    return _OPENAI_SEARCH_MODEL.search(upstream_id) is not None


def chat_web_searches(body: Mapping[str, Any], *, every_request: bool = False) -> int:
    """The web searches a chat completion has OpenAI run, and bill per call apart from the tokens: one for a request
    with ``web_search_options`` (its search models, gpt-4o-search-preview and the like, search the web once before
    each answer, and no usage reports it), and one for any request to a model that searches on every request
    (``every_request``: a search model, which searches without the field too); none otherwise."""
    return 1 if every_request or isinstance(body.get("web_search_options"), Mapping) else 0


# OpenRouter's web plugin (``plugins: [{"id": "web"}]``, or a model id ending ``:online``, its shortcut) fetches up to
# its ``max_results`` web results, 5 unless set, and bills each ($4 per 1,000 with Exa: up to $0.02 a request, its
# web search guide), not the request; its reply says how many were fetched nowhere (its usage has no count of them,
# and its ``url_citation`` annotations are the ones the answer cites), so each request is billed its ``max_results``.
WEB_PLUGIN_RESULTS = 5
ONLINE_SUFFIX = ":online"


def web_plugin_results(body: Mapping[str, Any], *, online: bool = False) -> int:
    """The web results OpenRouter's web plugin fetches, and bills per result, for a chat completion ``body``: its
    ``plugins`` entry ``{"id": "web"}``'s ``max_results`` (``WEB_PLUGIN_RESULTS`` unless a positive count), or with
    none, ``WEB_PLUGIN_RESULTS`` when the model runs the plugin on every request (``online``: an upstream id ending
    ``:online``); 0 otherwise."""
    plugins = body.get("plugins")
    for plugin in plugins if isinstance(plugins, list) else ():
        if isinstance(plugin, Mapping) and plugin.get("id") == "web":
            results = plugin.get("max_results")
            counted = isinstance(results, int) and not isinstance(results, bool) and results > 0
            return min(results, COUNT_MAX) if counted else WEB_PLUGIN_RESULTS
    return WEB_PLUGIN_RESULTS if online else 0


def upstream_online(upstream_id: str) -> bool:
    """Whether ``upstream_id`` is an OpenRouter model id with ``:online``, which runs the web plugin on every
    request."""
    return upstream_id.endswith(ONLINE_SUFFIX)


def web_searches_bound(
    body: Mapping[str, Any], *, every_request: bool = False, answers: int = 1, web_plugin_online: bool = False
) -> int:
    """The most web searches a request may have its provider run (and bill): for a Messages request each web search
    tool's ``max_uses`` (``web_search_20250305`` and later versions), ``WEB_SEARCHES_UNBOUNDED`` for one that sets
    none; for a chat completion the one its ``web_search_options`` asks for (``chat_web_searches``: its tools are
    functions, and the translations refuse server tools). ``every_request``: a model it may end on searches on every
    request (``searches_every_request``), one search for any request with messages (a chat completion, or a
    Messages request translated to it). 0 for a request without either.

    ``answers``: how many attempts may answer the request (a stream resumed on failure: each resumed attempt is a
    request of its own, which searches again before it answers). The chat's searches are counted each attempt; the
    tools' are not, as a Messages stream that relayed a search's blocks is not resumed (they are no text to continue):
    only the attempt that ends it runs them.

    OpenRouter's web plugin's results (``web_plugin_results``; ``web_plugin_online``: a deployment the request may end
    on has an ``:online`` id) are counted each attempt too, as OpenRouter bills them per result."""
    searches = chat_web_searches(body, every_request=every_request and isinstance(body.get("messages"), list))
    searches += web_plugin_results(body, online=web_plugin_online)
    searches *= max(answers, 1)
    tools = body.get("tools")
    if not isinstance(tools, list):
        return searches
    for tool in tools:
        if not isinstance(tool, Mapping) or not str(tool.get("type") or "").startswith("web_search_"):
            continue
        uses = tool.get("max_uses")
        bounded = isinstance(uses, int) and not isinstance(uses, bool) and uses > 0
        searches += uses if bounded else WEB_SEARCHES_UNBOUNDED
    return min(searches, COUNT_MAX)


def text_tokens(text: str) -> int:
    """The estimated tokens of text relayed to a client (a completion the provider did not count)."""
    if not text:
        return 0
    if text.isascii():
        return math.ceil(len(text) / CHARS_PER_TOKEN)
    counted = _Counted()
    counted.add(text)
    return counted.estimate()


def prompt_tokens(
    body: Mapping[str, Any], *, operation: str, upper_bound: bool = False, servers: Servers | None = None
) -> int:
    """The prompt's tokens in a request ``body`` of ``operation`` (``billing.models.Operation``'s value): an upper
    bound before the call, or the settle-time estimate. The body is one that passed validation; parts of a
    shape the walk does not know count for nothing rather than fail (settlement runs in a ``finally``).
    ``servers``: who may serve it (``served_by``), whose formulas bound its attachments; None: the dearest. The
    estimate counts each attachment ``IMAGE_TOKENS`` and reads none of them (a PDF is not decoded)."""
    if upper_bound or operation in (EMBEDDINGS, COMPLETIONS):
        upper, estimate = prompt_token_bounds(body, operation=operation, servers=servers)
        return upper if upper_bound else estimate
    counted, messages = _prompt_parts(body, servers, bounded=False)
    return _estimate(counted, messages)


def prompt_token_bounds(body: Mapping[str, Any], *, operation: str, servers: Servers | None = None) -> tuple[int, int]:
    """``prompt_tokens``' upper bound and estimate together, from one walk of the body: what admission needs
    (the bound to reserve, the estimate to judge whether a request can ever fit a tokens-per-minute limit).

    The bound counts each attachment at the most any of ``servers`` may bill it (``_attachment_most``: an image by
    its size, a PDF by its pages), all of them together at most the widest context window among them; the estimate
    counts each at ``IMAGE_TOKENS``."""
    if operation == EMBEDDINGS:
        value = body.get("input")
        return _embedding_input_bound(value), _input_tokens(value, upper_bound=False)
    if operation == COMPLETIONS:
        # A prompt (a text, texts, tokens) and the text after the gap a fill-in-the-middle request gives.
        parts = [body.get("prompt"), body.get("suffix")]
        upper = sum(_input_tokens(part, upper_bound=True) for part in parts)
        return upper + UPPER_OVERHEAD, sum(_input_tokens(part, upper_bound=False) for part in parts)
    servers = servers or EVERY_SERVER
    counted, messages = _prompt_parts(body, servers)
    return _bounds(counted, messages, servers)


async def prompt_token_bounds_async(
    body: Mapping[str, Any], *, operation: str, servers: Servers | None = None
) -> tuple[int, int]:
    """``prompt_token_bounds`` for a caller on the event loop (admission), the same figures: a PDF whose base64 is
    longer than ``PDF_ON_LOOP_CHARS_MOST`` is decoded and its pages counted in a thread (``asyncio.to_thread``), all
    such PDFs of the body in one, while the loop serves other requests; the rest of the walk runs on the loop."""
    if operation in (EMBEDDINGS, COMPLETIONS):
        return prompt_token_bounds(body, operation=operation, servers=servers)
    servers = servers or EVERY_SERVER
    deferred: list[tuple[str, int]] = []
    counted, messages = _prompt_parts(body, servers, deferred=deferred)
    if deferred:
        pages = await asyncio.to_thread(lambda: [inline_pdf_pages(data, start) for data, start in deferred])
        counted.attached_most += sum(pdf_tokens_most(count, servers) for count in pages)
    return _bounds(counted, messages, servers)


def _bounds(counted: _Counted, messages: int, servers: Servers) -> tuple[int, int]:
    attached_most = counted.attached_most
    if attached_most and servers.context_window is not None:
        attached_most = min(attached_most, servers.context_window)
    return (
        counted.upper() + UPPER_MESSAGE_FRAMING * messages + attached_most + UPPER_OVERHEAD,
        _estimate(counted, messages),
    )


def _estimate(counted: _Counted, messages: int) -> int:
    return counted.estimate() + MESSAGE_FRAMING * messages + IMAGE_TOKENS * counted.attachments


def _input_items(value: Any) -> list[Any]:
    """Embeddings' ``input`` (or a text completion's ``prompt``), a string, a list of strings, a token array or a
    list of token arrays, as a list of its inputs."""
    if isinstance(value, str) or (isinstance(value, list) and value and _is_token(value[0])):
        return [value]
    return value if isinstance(value, list) else []


def _embedding_input_bound(value: Any) -> int:
    """The most tokens an embeddings ``input`` can be counted: each text's UTF-8 bytes and its input's special
    tokens (``EMBEDDING_INPUT_OVERHEAD``), each token array's length."""
    total = 0
    for item in _input_items(value):
        if isinstance(item, str):
            total += len(item.encode("utf-8", "surrogatepass")) + EMBEDDING_INPUT_OVERHEAD
        elif isinstance(item, list):
            total += len(item)
    return total


def _input_tokens(value: Any, *, upper_bound: bool) -> int:
    """A text completion's ``prompt`` (and ``suffix``) bounded or estimated, or embeddings' ``input`` estimated."""
    total = 0
    for item in _input_items(value):
        if isinstance(item, str):
            counted = _Counted()
            counted.add(item)
            total += counted.upper() if upper_bound else counted.estimate()
        elif isinstance(item, list):
            total += len(item)
    return total


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _prompt_parts(
    body: Mapping[str, Any],
    servers: Servers | None = None,
    *,
    bounded: bool = True,
    deferred: list[tuple[str, int]] | None = None,
) -> tuple[_Counted, int]:
    """(texts and attachments, messages) of a chat completion or Messages request: Anthropic's ``system``
    (text or blocks), every message's text, tool calls (a legacy ``function_call`` too) and results, thinking (a
    chat completion's reasoning and ``thinking_blocks`` too), and the tools' definitions (the legacy ``functions``
    too). ``bounded``: the attachments' most is wanted (not for the estimate alone); ``deferred``: where a large PDF
    is put for the caller to count (``_Counted``)."""
    counted = _Counted(servers, bounded=bounded, deferred=deferred)
    counted.content(body.get("system"))
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        counted.content(message.get("content"))
        reasoning = [message[name] for name in REASONING_FIELDS if isinstance(message.get(name), str)]
        thinking = [text for _, text in thinking_block_texts(message)]
        if reasoning or thinking:
            # Claude's signed thinking sent back with the turn repeats its ``reasoning_content``, which Claude is not
            # sent again (and a server of the other spelling does not read the blocks): one text, counted once.
            for text in max(reasoning, thinking, key=lambda texts: sum(map(len, texts))):
                counted.add(text)
        # The tool calls' and a legacy ``function_call``'s arguments.
        calls = message.get("tool_calls") or ()
        functions = [call.get("function") if isinstance(call, Mapping) else None for call in calls]
        functions.append(message.get("function_call"))
        for function in functions:
            if isinstance(function, Mapping):
                counted.add(str(function.get("arguments") or ""))
    for definitions in (body.get("tools"), body.get("functions")):  # the legacy ``functions`` are tools too
        for tool in definitions or ():
            counted.add(_dumps(tool))
    return counted, len(messages)


class _Counted:
    """What a body's texts weigh (their characters, and of those the non-ASCII ones and their UTF-8 bytes) and its
    attachments: how many (``attachments``) and the most they may be billed together (``attached_most``; not read
    unless ``bounded``). ``deferred``: a list where each inline PDF past ``PDF_ON_LOOP_CHARS_MOST`` is put (its base64
    text and where its payload starts) rather than counted, for the caller to count off the event loop and add."""

    __slots__ = ("attached_most", "attachments", "bounded", "chars", "deferred", "servers", "wide_bytes", "wide_chars")

    def __init__(
        self, servers: Servers | None = None, *, bounded: bool = True, deferred: list[tuple[str, int]] | None = None
    ) -> None:
        self.chars = self.wide_chars = self.wide_bytes = self.attachments = self.attached_most = 0
        self.servers = servers or EVERY_SERVER
        self.bounded, self.deferred = bounded, deferred

    def add(self, text: str) -> None:
        self.chars += len(text)
        if text.isascii():
            return
        narrow = len(text.encode("ascii", "ignore"))  # its ASCII characters, at C speed
        self.wide_chars += len(text) - narrow
        # A lone surrogate (JSON allows one) weighs the 3 bytes it is sent as.
        self.wide_bytes += len(text.encode("utf-8", "surrogatepass")) - narrow

    def upper(self) -> int:
        """The bound: ASCII characters two a token, every other character a token a UTF-8 byte."""
        return math.ceil((self.chars - self.wide_chars) / UPPER_CHARS_PER_TOKEN) + self.wide_bytes

    def estimate(self) -> int:
        """The estimate: ASCII characters four a token, every other character half a token a UTF-8 byte past its
        first (exact in floating point: quarters and halves)."""
        narrow, extra_bytes = self.chars - self.wide_chars, self.wide_bytes - self.wide_chars
        return math.ceil(narrow / CHARS_PER_TOKEN + extra_bytes / EXTRA_BYTES_PER_TOKEN)

    def content(self, content: Any) -> None:
        if isinstance(content, str):
            self.add(content)
            return
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text":
                self.add(str(part.get("text") or ""))
            elif kind in _ATTACHMENTS:
                self.attachments += 1
                if self.bounded:
                    self.attached_most += _attachment_most(part, self.servers, self.deferred)
            elif kind in TOOL_CALL_BLOCKS:
                self.add(_dumps(part.get("input") or {}))
            elif kind in ("tool_result", "mcp_tool_result"):
                self.content(part.get("content"))
            elif kind == "thinking":
                self.add(str(part.get("thinking") or ""))


# What an attachment may be billed at most, before the call: one image's or one document's tokens by the formula
# of each provider that may serve the request (``served_by``), the dearest of them. Each provider documents its own:
# - OpenAI (kinds ``openai``, ``azure_openai``; its vision guide): detail ``low`` a fixed base; ``high`` or ``auto``
#   the image scaled to fit 2048×2048, then its shortest side to 768 (only ever down), a base plus a figure per
#   512-px tile: 85 + 170 (gpt-4o, gpt-4.1, gpt-4.5, gpt-5), 2,833 + 5,667 (gpt-4o-mini), 75 + 150 (o1, o3); the
#   patch-based models (gpt-4.1-mini and -nano, gpt-5-mini and -nano, o4-mini) count 32-px patches, at most 1,536,
#   times 1.62, 2.46 or 1.72, whatever the detail. An upstream id none of these names is reserved at the dearest.
# - Anthropic (its vision guide): about width × height / 750 for the models that resize to 1,568 px and ~1,600
#   tokens (capped here at 1568² / 750), ⌈w/28⌉ × ⌈h/28⌉ up to 4,784 for those that take 2,576 px;
#   the dearer of the two for every Claude. A PDF: 1,500 to 3,000 tokens of text a page plus the page as an image,
#   at most 600 pages a request (100 under a 1M context).
# - Gemini (its token guide): 258 tokens an image of at most 384 px a side, else 258 a tile (cut at most 768 px, at
#   least 256 px, a side: the shorter side / 1.5); Gemini 3 counts 1,120 an image at its default resolution. A PDF
#   page 258 (Gemini 2) or 560 (Gemini 3's default), at most 1,000 pages.
# Another kind (an OpenAI-compatible server, OpenRouter, Ollama, Mistral, Cohere: whose model's formula is not known)
# is reserved at the dearest of every formula above. An image whose size cannot be read (an http(s) URL, a file id, a
# type whose header is not read here) is reserved at its formula's most: 1,445 (gpt-4o's 8 tiles), 48,169
# (gpt-4o-mini's), 4,784 (Claude); Gemini documents none, and is reserved at the dearest, 48,169.
OPENAI_TILE_MOST = 8  # 2048 × 768 after scaling: 4 × 2 tiles of 512 px
OPENAI_PATCHES_MOST = 1_536
# Width × height / 750 within Claude's 1,568-px long edge, whatever its resize to "~1,600 tokens" leaves (its own
# table lists 1,639 for a 1:2 image): 1568² / 750.
CLAUDE_AREA_MOST = 3_279
CLAUDE_PATCHES_MOST = 4_784
GEMINI_IMAGE_TOKENS = 258
GEMINI_3_IMAGE_TOKENS = 1_120
# A PDF page's text at Anthropic's documented upper figure, beside its image; OpenAI documents none of its own and
# sends the page's text and image alike.
PDF_PAGE_TEXT_TOKENS = 3_000
GEMINI_PDF_PAGE_TOKENS = 560
CLAUDE_PDF_PAGES_MOST = 600
OPENAI_PDF_PAGES_MOST = 100
GEMINI_PDF_PAGES_MOST = 1_000
# How far into a JPEG its frame header (SOF) is looked for: past the metadata segments (EXIF, ICC profiles), which a
# camera's file keeps within its first tens of KiB. Not found by then, the image is reserved at its formula's most.
JPEG_HEADER_BYTES_MOST = 1 << 20
PDF_INFLATED_BYTES_MOST = 64 << 20  # a PDF's object streams, inflated to count its pages; past it: the most
# An inline PDF's base64 text past this many characters is decoded and its pages counted in a thread when admission
# bounds a prompt (``prompt_token_bounds_async``), not on the event loop: both cost about 4.5 µs a KB of PDF (the
# decode 58 %, the count 42 %), 0.95 ms for 200 KB (272,116 characters), 22 ms for 5 MB (docs/ledger.md).
PDF_ON_LOOP_CHARS_MOST = 256 * 1024
# A sound's tokens a second of it, as each provider documents them: OpenAI "audio tokens in user messages are 1 token
# per 100 ms of audio" (its Realtime API's cost guide, developers.openai.com/api/docs/guides/realtime-costs: the
# gpt-4o audio models' input); Gemini "represents each second of audio as 32 tokens" (its token guide,
# ai.google.dev/gemini-api/docs/tokens). Claude takes no sound. A sound is reserved its duration (read from its WAV or
# MP3 header: ``audio_duration``) at the dearest of these among the providers that may serve the request; a sound
# whose duration cannot be read, as before, ``IMAGE_TOKENS``.
OPENAI_AUDIO_TOKENS_PER_SECOND = 10
GEMINI_AUDIO_TOKENS_PER_SECOND = 32


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


class _Tiles:
    """OpenAI's tile formula: ``base`` (detail low) or ``base + tile × tiles``."""

    __slots__ = ("base", "tile")

    def __init__(self, base: int, tile: int) -> None:
        self.base, self.tile = base, tile

    def image(self, size: tuple[int, int] | None, detail: Any) -> int:
        if detail == "low":
            return self.base
        if size is None:
            return self.base + self.tile * OPENAI_TILE_MOST
        # The scaled sides exactly, as width / scale and height / scale (integers: Fractions cost 20 µs an image).
        width, height, scale = size[0], size[1], 1
        if max(width, height) > 2048:
            width, height, scale = width * 2048, height * 2048, max(width, height)
        if min(width, height) > 768 * scale:
            width, height, scale = width * 768, height * 768, min(width, height)
        return self.base + self.tile * _ceil_div(width, 512 * scale) * _ceil_div(height, 512 * scale)

    def pdf_page(self) -> int:
        return PDF_PAGE_TEXT_TOKENS + self.image(None, "high")

    pdf_pages_most = OPENAI_PDF_PAGES_MOST
    audio_per_second = OPENAI_AUDIO_TOKENS_PER_SECOND


class _Patches:
    """OpenAI's patch formula: 32-px patches, at most 1,536 (a larger image is scaled down to fit), × ``factor``."""

    __slots__ = ("hundredths",)

    def __init__(self, hundredths: int) -> None:
        self.hundredths = hundredths  # the multiplier × 100

    def image(self, size: tuple[int, int] | None, detail: Any) -> int:
        patches = OPENAI_PATCHES_MOST
        if size is not None:
            patches = min(_ceil_div(size[0], 32) * _ceil_div(size[1], 32), OPENAI_PATCHES_MOST)
        return _ceil_div(patches * self.hundredths, 100)

    def pdf_page(self) -> int:
        return PDF_PAGE_TEXT_TOKENS + self.image(None, "high")

    pdf_pages_most = OPENAI_PDF_PAGES_MOST
    audio_per_second = OPENAI_AUDIO_TOKENS_PER_SECOND


class _Claude:
    __slots__ = ()

    def image(self, size: tuple[int, int] | None, detail: Any) -> int:
        if size is None:
            return CLAUDE_PATCHES_MOST
        width, height = size
        area = min(_ceil_div(width * height, 750), CLAUDE_AREA_MOST)
        return max(area, min(_ceil_div(width, 28) * _ceil_div(height, 28), CLAUDE_PATCHES_MOST))

    def pdf_page(self) -> int:
        return PDF_PAGE_TEXT_TOKENS + CLAUDE_PATCHES_MOST

    pdf_pages_most = CLAUDE_PDF_PAGES_MOST
    audio_per_second = None  # Claude takes no sound


class _Gemini:
    __slots__ = ()

    def image(self, size: tuple[int, int] | None, detail: Any) -> int:
        if size is None:
            return IMAGE_TOKENS_MOST
        width, height = size
        if width <= 384 and height <= 384:
            return max(GEMINI_IMAGE_TOKENS, GEMINI_3_IMAGE_TOKENS)
        unit = min(max(min(width, height) * 2 // 3, 256), 768)
        tiles = _ceil_div(width, unit) * _ceil_div(height, unit)
        return max(GEMINI_IMAGE_TOKENS * tiles, GEMINI_3_IMAGE_TOKENS)

    def pdf_page(self) -> int:
        return max(GEMINI_IMAGE_TOKENS, GEMINI_PDF_PAGE_TOKENS)

    pdf_pages_most = GEMINI_PDF_PAGES_MOST
    audio_per_second = GEMINI_AUDIO_TOKENS_PER_SECOND


_GPT_4O = _Tiles(85, 170)
_GPT_4O_MINI = _Tiles(2_833, 5_667)
_O1 = _Tiles(75, 150)
_MINI_PATCHES, _NANO_PATCHES, _O4_MINI_PATCHES = _Patches(162), _Patches(246), _Patches(172)
_OPENAI_FORMULAS = (_GPT_4O, _GPT_4O_MINI, _O1, _MINI_PATCHES, _NANO_PATCHES, _O4_MINI_PATCHES)
_CLAUDE, _GEMINI = _Claude(), _Gemini()
_EVERY_FORMULA = (*_OPENAI_FORMULAS, _CLAUDE, _GEMINI)
IMAGE_TOKENS_MOST = _GPT_4O_MINI.base + _GPT_4O_MINI.tile * OPENAI_TILE_MOST  # 48,169: the dearest formula's most
# OpenAI's models by upstream id (a vendor's prefix, a dated snapshot or a fine-tune's ``ft:`` around it), first match.
_OPENAI_MODELS = (
    (re.compile(r"gpt-4o-mini"), (_GPT_4O_MINI,)),
    (re.compile(r"gpt-(?:4\.1|5(?:\.\d+)?)-nano"), (_NANO_PATCHES,)),
    (re.compile(r"gpt-(?:4\.1|5(?:\.\d+)?)-mini"), (_MINI_PATCHES,)),
    (re.compile(r"(?:^|[/:])o4-mini"), (_O4_MINI_PATCHES,)),
    (re.compile(r"(?:^|[/:])o[13](?:-pro)?(?:-\d{4}-\d{2}-\d{2})?$"), (_O1,)),
    (re.compile(r"gpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|gpt-4-turbo|computer-use"), (_GPT_4O,)),
)
_OPENAI_KINDS = frozenset({"openai", "azure_openai"})


def _formulas_for(kind: str, upstream_id: str) -> tuple[Any, ...]:
    if kind in _OPENAI_KINDS:
        name = upstream_id.lower()
        return next((formulas for pattern, formulas in _OPENAI_MODELS if pattern.search(name)), _OPENAI_FORMULAS)
    if kind == "anthropic":
        return (_CLAUDE,)
    if kind == "gemini":
        return (_GEMINI,)
    return _EVERY_FORMULA


class Servers:
    """The models that may serve a request (``served_by``), read only for a request with an attachment (a text
    request's path does no more than make this): their deployments' attachment formulas, and the widest context
    window among them (a prompt past it is refused by the provider, never billed, so the attachments are reserved at
    most that; None: no model known)."""

    __slots__ = ("_formulas", "models")

    def __init__(self, models: Sequence[Any] = (), formulas: tuple[Any, ...] | None = None) -> None:
        self.models, self._formulas = models, formulas

    @property
    def formulas(self) -> tuple[Any, ...]:
        if self._formulas is None:
            formulas: list[Any] = []
            for model in self.models:
                for deployment in model.deployments or (model,):
                    for formula in _formulas_for(str(deployment.provider.kind), deployment.upstream_id or ""):
                        if formula not in formulas:
                            formulas.append(formula)
            self._formulas = tuple(formulas) or _EVERY_FORMULA
        return self._formulas

    @property
    def context_window(self) -> int | None:
        return max((model.context_window or 0 for model in self.models), default=0) or None


EVERY_SERVER = Servers(formulas=_EVERY_FORMULA)  # no model known: the dearest formula


def served_by(models: Sequence[Any]) -> Servers:
    """The ``Servers`` of a request that may end on any deployment of ``models`` (``ResolvedModel``s: the model
    asked and its fallbacks)."""
    return Servers(models)


def image_tokens_most(size: tuple[int, int] | None, detail: Any = None, servers: Servers = EVERY_SERVER) -> int:
    """The most one image of ``size`` (width, height; None: unknown) may be billed by any of ``servers``."""
    return max(formula.image(size, detail) for formula in servers.formulas)


def pdf_tokens_most(pages: int | None, servers: Servers = EVERY_SERVER) -> int:
    """The most a PDF of ``pages`` pages (None: unknown, the provider's page limit) may be billed by any of
    ``servers``: a provider refuses a PDF past its page limit, so no more pages than that are reserved."""
    return max(
        formula.pdf_page() * min(pages or formula.pdf_pages_most, formula.pdf_pages_most)
        for formula in servers.formulas
    )


def audio_tokens_most(seconds: Fraction, servers: Servers = EVERY_SERVER) -> int:
    """The most a sound of ``seconds`` may be billed by any of ``servers``: its duration at the dearest documented
    rate among them (none documented, as for Claude alone: the dearest of all)."""
    rates = [formula.audio_per_second for formula in servers.formulas if formula.audio_per_second]
    return math.ceil(seconds * max(rates, default=GEMINI_AUDIO_TOKENS_PER_SECOND))


class _Base64:
    """The bytes of base64 text from ``start`` on, read where asked: only the 4-character groups holding them are
    decoded (strictly), so that a header is read without decoding, or copying, the image after it."""

    __slots__ = ("data", "start")

    def __init__(self, data: str, start: int = 0) -> None:
        self.data, self.start = data, start

    def read(self, offset: int, size: int) -> bytes | None:
        """``size`` bytes from ``offset`` (fewer at the end), None where the text is not strict base64."""
        first = self.start + offset // 3 * 4
        last = self.start + -(-(offset + size) // 3) * 4
        try:
            decoded = binascii.a2b_base64(self.data[first:last], strict_mode=True)
        except (binascii.Error, ValueError):
            return None
        skip = offset % 3
        return decoded[skip : skip + size]

    def size_most(self) -> int:
        """The most bytes the text decodes to: its characters past ``start``, three bytes for four, less its padding."""
        padding = 2 if self.data.endswith("==") else 1 if self.data.endswith("=") else 0
        return (len(self.data) - self.start) * 3 // 4 - padding

    def plain_to(self, offset: int) -> bool:
        """Whether the text up to byte ``offset`` is base64's alphabet alone: a line break or any other character
        there, which a lenient decoder skips, would move every byte after it from where ``read`` found it."""
        chars = self.data[self.start : self.start + -(-offset // 3) * 4]
        return not chars or (chars.isascii() and chars.encode("ascii").translate(None, b"+/").isalnum())


def image_size(data: str, start: int = 0) -> tuple[int, int] | None:
    """(width, height) an image's base64 ``data`` (from ``start``: a data URL's payload) declares in its header
    (PNG's IHDR, a JPEG's frame header, GIF's screen and first frame, WebP's VP8, VP8L or VP8X chunk), decoding only
    the bytes of the header; None for any other type or a header that does not read."""
    image = _Base64(data, start)
    head = image.read(0, 32)
    if head is None or len(head) < 10:
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR" and len(head) >= 24:
        return _positive(*struct.unpack(">II", head[16:24]))
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_size(image, head)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        return _webp_size(head)
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(image)
    return None


def _positive(width: int, height: int) -> tuple[int, int] | None:
    return (width, height) if width > 0 and height > 0 else None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return _positive(width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return _positive((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        return _positive(int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1)
    return None


GIF_HEADER_BYTES_MOST = 4096  # a GIF's first frame is looked for past its colour table and extensions this far


def _gif_size(image: _Base64, head: bytes) -> tuple[int, int] | None:
    """A GIF's logical screen, or its first frame where that is larger (a decoder may grow the canvas to it)."""
    width, height = struct.unpack("<HH", head[6:10])
    flags = head[10]
    offset = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    body = image.read(0, offset + GIF_HEADER_BYTES_MOST)
    if body is None:
        return None
    # Extension blocks (graphic control, comments, application data) before the first image descriptor.
    while offset < len(body) and body[offset] == 0x21:
        offset += 2
        while offset < len(body) and body[offset]:
            offset += body[offset] + 1
        offset += 1
    if offset + 9 > len(body) or body[offset] != 0x2C:
        return None
    left, top, frame_width, frame_height = struct.unpack("<HHHH", body[offset + 1 : offset + 9])
    return _positive(max(width, left + frame_width), max(height, top + frame_height))


# A JPEG's start-of-frame markers (SOF0-SOF15 but DHT, JPG and DAC, which share the range).
_JPEG_FRAMES = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_SEGMENTS_MOST = 256  # segments walked before the frame header (a camera's: a dozen; an ICC profile's: a few more)


def _jpeg_size(image: _Base64) -> tuple[int, int] | None:
    """The frame header's size, found by walking the segments from the start: each segment's 4-byte head is read,
    its length skips its body (an EXIF thumbnail's own frame header included) undecoded. Found, the text before it is
    checked to be plain base64 (``_Base64.plain_to``), else the walk's offsets cannot be trusted."""
    offset = 2
    for _ in range(JPEG_SEGMENTS_MOST):
        if offset > JPEG_HEADER_BYTES_MOST:
            return None
        head = image.read(offset, 9)
        if head is None or len(head) < 4 or head[0] != 0xFF:
            return None
        marker = head[1]
        if marker == 0xFF:  # a fill byte
            offset += 1
        elif marker in _JPEG_FRAMES:
            if len(head) < 9 or not image.plain_to(offset):
                return None
            height, width = struct.unpack(">HH", head[5:9])
            return _positive(width, height)
        elif marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length of their own
            offset += 2
        elif marker == 0xDA:  # scan data before any frame header: no JPEG a decoder reads
            return None
        else:
            offset += 2 + struct.unpack(">H", head[2:4])[0]
    return None


# WAV's sample formats whose byte rate is the sample rate times the block (a frame of every channel's sample): PCM,
# IEEE float, A-law, µ-law, and the extensible header (which names one of them).
_WAV_FRAMED = frozenset({1, 3, 6, 7, 0xFFFE})
WAV_CHUNKS_MOST = 64  # chunks walked before the data chunk (fmt, and a few of metadata: LIST, fact, bext)
# MP3 (MPEG audio layer III): kbit/s by bitrate index, for MPEG-1 and for MPEG-2 and 2.5; Hz by sample rate index.
_MP3_KBPS = {
    3: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_HZ = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def audio_duration(data: str) -> Fraction | None:
    """How long a sound given as base64 ``data`` (an ``input_audio`` part's) lasts at most, in seconds, read from its
    header, decoding only the header's bytes: a WAV's exactly (``_wav_duration``), an MP3's from its first frame
    (``_mp3_duration``); None for anything else, or a header that does not read."""
    sound = _Base64(data)
    head = sound.read(0, 12)
    if head is None or len(head) < 12:
        return None
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return _wav_duration(sound)
    return _mp3_duration(sound, head)


def _wav_duration(sound: _Base64) -> Fraction | None:
    """The data chunk's bytes over the byte rate of its ``fmt `` chunk's sample rate and block, for the formats whose
    byte rate that is (``_WAV_FRAMED``; the header's own byte rate field is not read, nor a block larger than its
    channels' samples). The data's bytes are the
    chunk's declared size, or what the text holds after it when that is less, or when the size is 0 or 0xFFFFFFFF (a
    recorder that streamed it)."""
    offset, framing = 12, None
    for _ in range(WAV_CHUNKS_MOST):
        chunk = sound.read(offset, 8)
        if chunk is None or len(chunk) < 8:
            return None
        kind, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        if kind == b"fmt ":
            fmt = sound.read(offset + 8, 16)
            if size < 16 or fmt is None or len(fmt) < 16:
                return None
            sample_format, channels, rate, _byte_rate, block, bits = struct.unpack("<HHIIHH", fmt)
            # The block its channels and sample size make, or the header's when smaller: the longer duration.
            framing = (sample_format, rate, min(block, channels * _ceil_div(bits, 8)))
        elif kind == b"data":
            if framing is None or framing[0] not in _WAV_FRAMED or framing[1] <= 0 or framing[2] <= 0:
                return None
            start = offset + 8
            if not sound.plain_to(start):
                return None
            present = max(sound.size_most() - start, 0)
            data_bytes = present if size in (0, 0xFFFFFFFF) else min(size, present)
            return Fraction(data_bytes, framing[1] * framing[2])
        offset += 8 + size + (size & 1)
    return None


def _mp3_duration(sound: _Base64, head: bytes) -> Fraction | None:
    """From the first frame's header (past an ID3v2 tag): the longer of the bytes from it on at its bitrate (a
    constant bitrate's duration) and, when the frame holds a Xing or Info header, or Fraunhofer's VBRI, with a frame
    count, those frames' samples at its sample rate (a variable bitrate's). MPEG-1, 2 and 2.5 layer III."""
    offset = 0
    if head[:3] == b"ID3":
        size = (head[6] & 0x7F) << 21 | (head[7] & 0x7F) << 14 | (head[8] & 0x7F) << 7 | (head[9] & 0x7F)
        offset = 10 + size + (10 if head[5] & 0x10 else 0)
    frame = sound.read(offset, 4)
    if frame is None or len(frame) < 4 or frame[0] != 0xFF or frame[1] & 0xE0 != 0xE0:
        return None
    version, layer = (frame[1] >> 3) & 3, (frame[1] >> 1) & 3
    bitrate_index, rate_index = frame[2] >> 4, (frame[2] >> 2) & 3
    if version == 1 or layer != 1 or bitrate_index in (0, 15) or rate_index == 3 or not sound.plain_to(offset):
        return None
    kbps = _MP3_KBPS[3 if version == 3 else 2][bitrate_index]
    rate = _MP3_HZ[version][rate_index]
    mono = frame[3] >> 6 == 3
    seconds = Fraction(max(sound.size_most() - offset, 0) * 8, kbps * 1000)
    samples = 1152 if version == 3 else 576
    side_info = (17 if mono else 32) if version == 3 else (9 if mono else 17)
    xing = sound.read(offset + 4 + side_info, 12)
    frames = None
    if xing is not None and len(xing) == 12 and xing[:4] in (b"Xing", b"Info") and xing[7] & 1:
        frames = struct.unpack(">I", xing[8:12])[0]
    vbri = sound.read(offset + 36, 18)
    if vbri is not None and len(vbri) == 18 and vbri[:4] == b"VBRI":
        frames = struct.unpack(">I", vbri[14:18])[0]
    if frames is not None:
        seconds = max(seconds, Fraction(frames * samples, rate))
    return seconds


# A PDF's page tree's counts (``/Count N``: the root's is every page).
_PDF_COUNT = re.compile(rb"/Count\s+(\d{1,9})")


def pdf_pages(data: bytes) -> int | None:
    """How many pages a PDF has, at most: the more of its ``/Page`` names (each page object's ``/Type /Page``, and a
    few others, ``/PageLabels``, ``/PageMode``: an upper bound; not ``/Pages``) and its page tree's largest
    ``/Count``, in its body and in its object streams (PDF 1.5's compressed objects, inflated: a stream that does not
    inflate, as an encrypted PDF's, or past ``PDF_INFLATED_BYTES_MOST`` in all, leaves the count unknown). Found by
    ``bytes.count`` and ``find``, at C speed over the whole file. None when none is found."""
    texts = [data]
    inflated = 0
    position = data.find(b"/ObjStm")
    while position >= 0:
        start = data.find(b"stream", position)
        end = data.find(b"endstream", start)
        if start < 0 or end < 0:
            return None
        start += len(b"stream")
        start += 2 if data[start : start + 2] == b"\r\n" else 1
        inflater = zlib.decompressobj()
        try:
            texts.append(inflater.decompress(data[start:end], PDF_INFLATED_BYTES_MOST - inflated))
        except zlib.error:
            return None
        if inflater.unconsumed_tail:
            return None
        inflated += len(texts[-1])
        position = data.find(b"/ObjStm", end)
    names = counted = 0
    for text in texts:
        names += text.count(b"/Page") - text.count(b"/Pages")
        position = text.find(b"/Count")
        while position >= 0:
            found = _PDF_COUNT.match(text, position)
            if found:
                counted = max(counted, int(found[1]))
            position = text.find(b"/Count", position + 6)
    return max(names, counted) or None


def _data_url_base64(url: Any) -> int | None:
    """Where a base64 data URL's payload starts, else None (an http(s) URL, a file id, a percent-encoded data URL)."""
    if not isinstance(url, str) or not url.startswith("data:"):
        return None
    comma = url.find(",", 0, 256)  # its header: a media type and its parameters
    return comma + 1 if comma > 0 and url[:comma].endswith(";base64") else None


def inline_pdf_pages(data: str, start: int = 0) -> int | None:
    """The pages of a document given inline as base64 ``data`` (from ``start``) when it is a PDF whose pages are
    counted (``pdf_pages``); None for anything else (not strict base64, no PDF, pages not found)."""
    try:
        raw = binascii.a2b_base64(data[start:] if start else data, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    if b"%PDF-" in raw[:1024]:  # PDF readers take a header within the first KiB
        return pdf_pages(raw)
    return None


def _document_most(data: Any, servers: Servers, start: int = 0, deferred: list[tuple[str, int]] | None = None) -> int:
    """A document given inline as base64 ``data`` (from ``start``): a PDF by its pages; anything else, or a document
    given by URL or file id (``data`` None), at the provider's page limit. With ``deferred``, a large one is put there
    (0 here) for the caller to count (``prompt_token_bounds_async``)."""
    if not isinstance(data, str):
        return pdf_tokens_most(None, servers)
    if deferred is not None and len(data) - start > PDF_ON_LOOP_CHARS_MOST:
        deferred.append((data, start))
        return 0
    return pdf_tokens_most(inline_pdf_pages(data, start), servers)


def _attachment_most(part: Mapping[str, Any], servers: Servers, deferred: list[tuple[str, int]] | None = None) -> int:
    """The most one attachment (a chat completion's image or file part, a Messages image or document block) may be
    billed by any of ``servers`` (a large inline PDF put in ``deferred`` instead, when given: ``_document_most``). A
    sound by its duration (``audio_duration``, ``audio_tokens_most``); one whose duration cannot be read as before,
    ``IMAGE_TOKENS``."""
    kind = part.get("type")
    if kind == "image_url":
        image = part.get("image_url")
        url, detail = (image.get("url"), image.get("detail")) if isinstance(image, Mapping) else (image, None)
        start = _data_url_base64(url)
        return image_tokens_most(image_size(url, start) if start is not None else None, detail, servers)
    if kind == "input_audio":
        audio = part.get("input_audio")
        data = audio.get("data") if isinstance(audio, Mapping) else None
        seconds = audio_duration(data) if isinstance(data, str) else None
        return IMAGE_TOKENS if seconds is None else audio_tokens_most(seconds, servers)
    source = part.get("source")
    source = source if isinstance(source, Mapping) else {}
    inline = source.get("data") if source.get("type") == "base64" else None
    if kind == "image":
        return image_tokens_most(image_size(inline) if isinstance(inline, str) else None, None, servers)
    if kind == "file":
        file = part.get("file")
        data = file.get("file_data") if isinstance(file, Mapping) else None
        # A data URL's payload, or (OpenAI's spec: "the base64 encoded file data") the base64 alone.
        return _document_most(data, servers, _data_url_base64(data) or 0, deferred)
    if kind == "document":
        if source.get("type") == "text" and isinstance(source.get("data"), str):
            return len(source["data"].encode("utf-8", "surrogatepass"))  # a byte a token at most
        if source.get("type") == "content" and isinstance(source.get("content"), list):
            return sum(
                len(str(block.get("text") or "").encode("utf-8", "surrogatepass"))
                if block.get("type") == "text"
                else _attachment_most(block, servers, deferred)
                for block in source["content"]
                if isinstance(block, Mapping)
            )
        return _document_most(inline, servers, 0, deferred)
    return IMAGE_TOKENS


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)
