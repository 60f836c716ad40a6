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
  about twice: alike slack, given back at settlement. Plus the per-message framing, a fixed charge per image and a
  little overhead.
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

import json
import math
import re
from collections.abc import Mapping
from typing import Any

CHARS_PER_TOKEN = 4  # an estimate: English averages about four characters a token
UPPER_CHARS_PER_TOKEN = 2  # a bound for ASCII text: tokenizers rarely fall below two characters a token
# An estimate for any other character: a token for every two of its UTF-8 bytes past the first (one a CJK character).
EXTRA_BYTES_PER_TOKEN = 2
IMAGE_TOKENS = 1_600  # Anthropic's estimate for a mid-sized image; attachments of every kind count as one
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


def prompt_tokens(body: Mapping[str, Any], *, operation: str, upper_bound: bool = False) -> int:
    """The prompt's tokens in a request ``body`` of ``operation`` (``billing.models.Operation``'s value): an upper
    bound before the call, or the settle-time estimate. The body is one that passed validation; parts of a
    shape the walk does not know count for nothing rather than fail (settlement runs in a ``finally``)."""
    upper, estimate = prompt_token_bounds(body, operation=operation)
    return upper if upper_bound else estimate


def prompt_token_bounds(body: Mapping[str, Any], *, operation: str) -> tuple[int, int]:
    """``prompt_tokens``' upper bound and estimate together, from one walk of the body: what admission needs
    (the bound to reserve, the estimate to judge whether a request can ever fit a tokens-per-minute limit)."""
    if operation == EMBEDDINGS:
        value = body.get("input")
        return _embedding_input_bound(value), _input_tokens(value, upper_bound=False)
    if operation == COMPLETIONS:
        # A prompt (a text, texts, tokens) and the text after the gap a fill-in-the-middle request gives.
        parts = [body.get("prompt"), body.get("suffix")]
        upper = sum(_input_tokens(part, upper_bound=True) for part in parts)
        return upper + UPPER_OVERHEAD, sum(_input_tokens(part, upper_bound=False) for part in parts)
    counted, messages = _prompt_parts(body)
    attached = IMAGE_TOKENS * counted.attachments
    return (
        counted.upper() + UPPER_MESSAGE_FRAMING * messages + attached + UPPER_OVERHEAD,
        counted.estimate() + MESSAGE_FRAMING * messages + attached,
    )


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


def _prompt_parts(body: Mapping[str, Any]) -> tuple[_Counted, int]:
    """(texts and attachments, messages) of a chat completion or Messages request: Anthropic's ``system``
    (text or blocks), every message's text, tool calls (a legacy ``function_call`` too) and results, thinking (a
    chat completion's reasoning and ``thinking_blocks`` too), and the tools' definitions (the legacy ``functions``
    too)."""
    counted = _Counted()
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
    attachments."""

    __slots__ = ("attachments", "chars", "wide_bytes", "wide_chars")

    def __init__(self) -> None:
        self.chars = self.wide_chars = self.wide_bytes = self.attachments = 0

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
            elif kind in TOOL_CALL_BLOCKS:
                self.add(_dumps(part.get("input") or {}))
            elif kind in ("tool_result", "mcp_tool_result"):
                self.content(part.get("content"))
            elif kind == "thinking":
                self.add(str(part.get("thinking") or ""))


def _dumps(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)
