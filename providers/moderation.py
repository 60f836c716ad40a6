"""Moderation policies as the request path reads them: cached snapshots, the block-list matcher and the
OpenAI checker. ``chat.moderation`` decides what a finding does to a request (refuse, cut, record).

The block-list is compiled once per policy version (the snapshot is rebuilt when the row is saved): words
and phrases become one case-insensitive regular expression of whole words, their alternatives laid out as a
trie (``for(?:bid(?:den)?|ce)``: Python's ``re`` follows the one path the text spells, where it tried a flat
alternation's every entry at every position), and ``re:`` entries are compiled one by one with RE2
(``google-re2``, Google's bindings), whose matching time is linear in the text whatever the pattern. Python's
``re`` has no time limit, and a vet of a pattern's shape cannot make it linear: ``a.*c`` took about a minute
on 200,000 characters, with the event loop stalled the while. RE2 has no look-arounds or back-references, so a
pattern that needs them is refused when saved (``blocklist_problems``), with one that matches empty text or is
too long. The text one scan reads is still capped (``SCAN_LIMIT_CHARS``): a whole input is read a window at a
time (``Blocklist.scan_whole``).

Entries and text are matched in their plain form (``PlainText``): compatibility forms mapped (NFKC: full-width
letters, ligatures, mathematical and circled letters), invisible characters dropped (format characters and the
other default-ignorable code points: zero-width spaces and joiners, soft hyphens, bidi controls, variation
selectors, tag characters) and so are the diacritics added to letters (accents, "zalgo" marks); "ß" is "ss". Read
as it came, ``ｆｏｒｂｉｄｄｅｎ``, ``for\u200bbidden`` or ``fòrbíddén`` passed a list naming "forbidden". A scan reads
the Cyrillic and Greek letters drawn as Latin ones as those letters in a word that mixes them with Latin letters
(``_lookalikes_read``), where ``fоrbidden`` with a Cyrillic "о" passed too.
"""

from __future__ import annotations

import _sre
import asyncio
import functools
import itertools
import random
import re
import unicodedata
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from re._casefix import _EXTRA_CASES
from typing import Any

import re2
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from core.cache import TTLCache, forget_now_and_after_commit

from .adapters import adapter_for
from .exceptions import ProviderError, ProviderQuotaExhaustedError, ProviderRateLimitError
from .models import ModerationAction, ModerationChecker, ModerationPolicy, Provider
from .selectors import provider_config
from .types import ProviderConfig

PATTERN_PREFIX = "re:"
MAX_ENTRIES = 2000
MAX_PATTERN_CHARS = 300
# At most this much text is handed to the block-list at once (the tail of a longer input): bounds the
# work of one scan whatever a client sends.
SCAN_LIMIT_CHARS = 200_000
# What a stream's scan re-reads before its new text when the list holds patterns (their length is not
# known): a pattern match longer than this that spans two checks is found only by the final check.
PATTERN_OVERLAP_CHARS = 256
# What the OpenAI checker sends the moderation service. A text is sent as inputs of at most ``OPENAI_INPUT_CHARS``
# characters, each re-reading the last ``OPENAI_SEAM_CHARS`` of the one before, so that a passage across their seam
# is read whole by one of them; at most ``OPENAI_INPUTS_PER_CALL`` inputs a call, and at most
# ``OPENAI_CALLS_AT_ONCE`` calls in flight for one text. OpenAI's moderation reads only the start of a long input
# (its models page: text-moderation truncates past 32,768 tokens; omni-moderation was reported to answer an input
# past about 4,000 tokens as if it were empty, Wei-Shaw/sub2api#5214), and 4,000 characters are at most about
# 4,000 tokens in any script a token a character or less (about 1,000 in English). OpenAI documents no number of
# inputs a call: 32 keep a call's body about 130 KB (about 32,000 tokens of English) and its answer quick. So the
# text of one request (at most ``LLMHUB_MAX_REQUEST_TEXT_CHARS``, 4,000,000 characters) costs at most 36 calls,
# about 1.14 times its characters sent (``docs/moderation.md``, "What a long input costs").
OPENAI_INPUT_CHARS = 4_000
OPENAI_SEAM_CHARS = 500
OPENAI_INPUTS_PER_CALL = 32
OPENAI_CALLS_AT_ONCE = 4
# A call the service answers 429 (rate limited: OpenAI's moderation is limited by the token, and a long input's
# calls at once meet the limit at low usage tiers) is asked again, at most ``OPENAI_RATE_LIMIT_RETRIES`` times, after
# the wait the service says (``retry-after-ms``, ``retry-after``), else a backoff with full jitter (a uniform wait up
# to ``OPENAI_RATE_LIMIT_BACKOFF_SECONDS`` doubled at each retry, at most ``OPENAI_RATE_LIMIT_BACKOFF_CAP_SECONDS``:
# the calls limited together do not come back together), all within the check's one deadline (the policy's
# ``timeout_seconds`` from the check's start, ``PolicySnapshot.ask_service``): a wait that would end past it is not
# waited, and the 429 fails the call at once.
OPENAI_RATE_LIMIT_RETRIES = 3
OPENAI_RATE_LIMIT_BACKOFF_SECONDS = 0.25
OPENAI_RATE_LIMIT_BACKOFF_CAP_SECONDS = 2.0
# The words' trie is written as nested groups this many characters deep, and as an alternation of the rest below
# that: ``re`` parses a group within a group recursively, and a few hundred levels exhaust Python's stack.
_TRIE_DEPTH = 64


class ModerationServiceError(Exception):
    """The moderation service could not give an answer (down, refused, too slow, nonsense)."""


@dataclass(frozen=True, slots=True)
class Hit:
    """What a checker found: categories (``blocklist`` for the block-list) and where, never the content."""

    categories: tuple[str, ...]
    where: str = ""
    # A block-list's: the entry's line and the character the match begins at in the text as sent.
    entry: int | None = None
    at: int | None = None
    field: str | None = None  # where in the request (``messages[2].content``), when the caller places it

    def describe(self) -> str:
        return ", ".join(self.categories) + (f" ({self.where})" if self.where else "")


# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt) beyond the format characters (category Cf),
# which are all dropped too: a reader does not see them, so a word written with them between its letters is the
# word. (Python's ``unicodedata`` does not expose the property.)
_IGNORABLE_RANGES = (
    (0x034F, 0x034F),  # combining grapheme joiner
    (0x115F, 0x1160),  # Hangul fillers
    (0x17B4, 0x17B5),  # Khmer inherent vowels
    (0x180B, 0x180F),  # Mongolian variation selectors and vowel separator
    (0x2065, 0x2065),
    (0x3164, 0x3164),  # Hangul filler
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFA0, 0xFFA0),  # half-width Hangul filler
    (0xFFF0, 0xFFF8),
    (0xE0000, 0xE0FFF),  # tag characters, variation selectors 17-256 and their reserved neighbours
)
# The combining diacritics, which the plain form drops (with the letter's own: "é" reads "e"): the blocks of marks
# that any script borrows, which accents and "zalgo" text (a stack of marks on each letter, or one drawn through it)
# are made of. A mark of another block (a Japanese voiced mark, a Devanagari vowel sign, a Thai tone) is kept: it
# spells another word (ば is not は), which an entry must not match.
_DIACRITIC_RANGES = (
    (0x0300, 0x036F),  # combining diacritical marks
    (0x0483, 0x0489),  # Cyrillic titlo and the like, and its enclosing marks
    (0x1AB0, 0x1AFF),  # combining diacritical marks extended
    (0x1DC0, 0x1DFF),  # combining diacritical marks supplement
    (0x20D0, 0x20FF),  # combining marks for symbols (enclosing circles, keycaps, overlays)
    (0xFE20, 0xFE2F),  # combining half marks
)
# A run of characters the plain form changes goes on over at most this many others between two of them, and
# for at most this many of them: a hit inside a run that changed length is placed a character at a time.
_RUN_GAP = 32
_RUN_STEPS = 256
# A text's last character waits for the next piece (a combining mark may still attach to it), with at most this
# many marks after it: a longer run is taken as it stands, so a stream of marks cannot make each piece re-read it.
_TAIL_CHARS = 32


def _character_class(code_points: list[int]) -> str:
    ranges: list[str] = []
    run_start = previous = -2
    for code_point in [*sorted(code_points), -1]:
        if code_point != previous + 1:
            if run_start >= 0:
                ranges.append(f"\\U{run_start:08x}" + (f"-\\U{previous:08x}" if previous != run_start else ""))
            run_start = code_point
        previous = code_point
    return "".join(ranges)


@dataclass(frozen=True, slots=True)
class _PlainForm:
    dropped: re.Pattern[str]  # the invisible characters and the diacritics
    # The letters whose full case folding is longer than they are ("ß" is "ss"), which the matcher's simple case
    # folding does not equate with it, and that folding.
    folds: tuple[tuple[str, str], ...]
    # Runs of characters the plain form may change, or that may join the one before them, with what lies between
    # them when it is short (French words with accents, a full-width sentence, are one run, whose plain form is
    # taken at once, at the speed of C, where each accent was a step of Python's). All else is kept as it is, at the
    # speed of a copy.
    changing: re.Pattern[str]
    joins: frozenset[str]  # characters that may combine with the one before them


@functools.cache
def _plain_form() -> _PlainForm:
    """The character classes of the plain form, computed once a process from Python's Unicode database (about
    0.2 s: the server's warm-up does it, ``llmhub.lifespan``)."""
    ignorable = {cp for low, high in _IGNORABLE_RANGES for cp in range(low, high + 1)}
    marks = {
        cp
        for low, high in _DIACRITIC_RANGES
        for cp in range(low, high + 1)
        if unicodedata.category(chr(cp)) in ("Mn", "Me")
    }
    decomposed: list[str] = []
    expanding: list[str] = []  # the letters whose full case folding is longer
    joins: set[int] = set(range(0x1160, 0x1200)) | set(range(0xD7B0, 0xD800))  # Hangul vowels and finals
    joins |= marks  # an enclosing mark combines nothing, but belongs to the character before it all the same
    for code_point in range(0x80, 0x110000):
        character = chr(code_point)
        category = unicodedata.category(character)
        if category == "Cf":
            ignorable.add(code_point)
        elif category in ("Ll", "Lu", "Lt") and len(character.casefold()) > 1:
            expanding.append(character)
        if unicodedata.combining(character):
            joins.add(code_point)
        decomposition = unicodedata.decomposition(character)
        if decomposition:  # only a character with a decomposition may change alone (but for the marks dropped)
            decomposed.append(character)
            parts = decomposition.split()
            if not parts[0].startswith("<") and len(parts) == 2:
                joins.add(int(parts[1], 16))  # the second of a composition pair (a few vowel signs are no marks)
    dropped = re.compile(f"[{_character_class(sorted(ignorable | marks))}]+")
    # Most of them are a letter and a mark (İ, ǰ) or a compatibility form (ﬀ), which the rest of the form maps: the
    # ones left (ß and ẞ) are folded.
    left = sorted({c for letter in expanding for c in _plain_with(letter, dropped, ()) if len(c.casefold()) > 1})
    folds = tuple((letter, _plain_with(letter.casefold(), dropped, ())) for letter in left)
    changes = marks | {ord(c) for c in [*decomposed, *left] if _plain_with(c, dropped, folds) != c}
    joining = {chr(cp) for cp in joins}
    joins |= {cp for cp in changes if unicodedata.normalize("NFKC", chr(cp))[:1] in joining}  # compatibility jamo
    joins |= ignorable  # an invisible character between a letter and its mark must not keep them apart
    # Every character beyond the BMP counts as changing: ``re`` tests a class's BMP part as one table, and its
    # other ranges one by one, for every character of the text.
    changing = _character_class([cp for cp in changes | joins if cp < 0x10000]) + "\\U00010000-\\U0010ffff"
    return _PlainForm(
        dropped=dropped,
        folds=folds,
        changing=re.compile(f"[{changing}](?:[^{changing}]{{0,{_RUN_GAP}}}[{changing}]){{0,{_RUN_STEPS}}}"),
        joins=frozenset(chr(cp) for cp in joins),
    )


def _plain(text: str) -> str:
    """NFKC without the invisible characters and the diacritics, fully case-folded: decomposed (compatibility forms
    mapped, a few of them to invisible characters), the invisible characters and the diacritics dropped, what is
    left composed again (a mark that an invisible character kept apart from its letter goes with it), and a
    letter whose case folding is longer than it folded ("ß" is "ss"; the matcher folds the rest of the case)."""
    if text.isascii():
        return text
    form = _plain_form()
    return _plain_with(text, form.dropped, form.folds)


def _plain_with(text: str, dropped: re.Pattern[str], folds: tuple[tuple[str, str], ...]) -> str:
    text = unicodedata.normalize("NFC", dropped.sub("", unicodedata.normalize("NFKD", text)))
    for letter, folded in folds:
        if letter in text:
            text = text.replace(letter, folded)
    return text


_plain_group = functools.lru_cache(maxsize=4096)(_plain)  # a character and its marks, or a short run

# The scripts written without spaces between words: Thai, Lao, Myanmar, Khmer, and Chinese and Japanese (kana, the
# CJK ideographs and their iteration marks). A text's words there are one run of letters, so an entry's edge in one of
# them is matched without a word boundary. (Python's ``re`` has no script property: the scripts' blocks.)
_UNSPACED_RANGES = (
    (0x0E00, 0x0EFF),  # Thai, Lao
    (0x1000, 0x109F),  # Myanmar
    (0x1780, 0x17FF),  # Khmer
    (0x19E0, 0x19FF),  # Khmer symbols
    (0x3005, 0x3007),  # 々 〆 〇
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x31F0, 0x31FF),  # Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xA9E0, 0xA9FF),  # Myanmar extended B
    (0xAA60, 0xAA7F),  # Myanmar extended A
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0x20000, 0x323AF),  # CJK extensions B to H, compatibility supplement
)
_UNSPACED_CLASS = "".join(f"\\U{low:08x}-\\U{high:08x}" for low, high in _UNSPACED_RANGES)
_UNSPACED = re.compile(f"[{_UNSPACED_CLASS}]")
# A word's edge: no letter or digit beside it, but for one of those scripts (a Latin word written against Chinese,
# "我要forbidden的", is a whole word there).
_WORD_BESIDE = f"[^\\W{_UNSPACED_CLASS}]"

# The letters of Cyrillic and Greek drawn as a Latin one (a small table of Unicode TR39's confusables: no library of
# them is installed), in their plain form. A word that mixes them with Latin letters reads them as those letters:
# "fоrbidden" with a Cyrillic "о" is "forbidden". A word wholly of one script is left as it is: Russian "сор" is
# not "cop", nor Greek "χορός" anything English.
_LOOKALIKES = str.maketrans(
    {
        # Cyrillic
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j",
        "ԁ": "d", "һ": "h", "ӏ": "l", "ԛ": "q", "ԝ": "w", "ү": "y",
        "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
        "У": "Y", "Х": "X", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q", "Ԝ": "W", "Ү": "Y", "Ӏ": "l",
        # Greek
        "α": "a", "ι": "i", "ν": "v", "ο": "o", "ρ": "p", "υ": "u", "χ": "x",
        "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
        "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    }
)  # fmt: skip
_LOOKALIKE = "[" + "".join(map(chr, _LOOKALIKES)) + "]"
_LATIN = "[A-Za-z\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u024f\u1e00-\u1eff]"
_HAS_LOOKALIKE = re.compile(_LOOKALIKE)
# A word holding a Latin letter and a look-alike: each looked for from the word's start, so that the text is read
# in linear time however long its words.
_MIXED_WORD = re.compile(rf"(?<!\w)(?=\w*?{_LATIN})(?=\w*?{_LOOKALIKE})\w+")


def _lookalikes_read(text: str, start: int, end: int, reach: int) -> tuple[str, int]:
    """``text[start:end]`` as the matcher reads it, the look-alikes of a word that mixes scripts read as the Latin
    letters they look like: the text itself when there are none (no copy), else the part of it from the beginning of
    the word ``start`` is in (at most ``reach`` characters before), and where that begins in ``text``. The mapping
    keeps every character one, so that positions stay those of the plain form."""
    if _HAS_LOOKALIKE.search(text, start, end) is None:
        return text, 0
    begin = start
    while begin > 0 and start - begin < reach and (text[begin - 1].isalnum() or text[begin - 1] == "_"):
        begin -= 1  # a word that is Latin before ``start`` and goes on in look-alikes
    pieces: list[str] = []
    kept = begin
    for word in _MIXED_WORD.finditer(text, begin, end):
        pieces += (text[kept : word.start()], word.group().translate(_LOOKALIKES))
        kept = word.end()
    if not pieces:
        return text, 0
    pieces.append(text[kept:end])
    return "".join(pieces), begin


class PlainText:
    """A text as a block-list reads it, built piece by piece (a stream's) or at once: its plain form (``text``),
    and where each of its characters was in the text as sent (``original``), so that a hit names the client's
    own character. The form is NFKC without the invisible characters and the diacritics (``_plain``): the last
    character waits in ``_tail`` until the next piece shows whether a mark follows it.

    A run of characters the form keeps as they are costs one regular-expression step: plain ASCII, or text
    already in the plain form, is copied, and only the runs of what changes (with what lies shortly between) are
    put through ``_plain``."""

    def __init__(self, text: str = "", *, whole: bool = True) -> None:
        self._parts: list[str] = []
        self._length = 0  # plain characters settled
        self._taken = 0  # original characters settled
        self._tail = ""  # original characters not settled yet: the last character and its marks
        # Where the offset between original and plain positions changes: from plain position _at[i] on, the
        # original position is the plain one plus _shift[i] (inside a character that grew, its first).
        self._at = [0]
        self._shift = [0]
        # The runs whose plain form is of another length, by where they begin in ``text``: (where they end, where
        # they began in the text as sent, the run as sent), read again only to place a hit inside one.
        self._runs_at: list[int] = []
        self._runs: list[tuple[int, int, str]] = []
        self._view: str | None = None  # ``text``, until the next piece
        self._base = 0  # where ``text`` begins in the plain form: what a whole input's scan let go of (``release``)
        if text:
            self.add(text)
        if whole:
            self.close()

    @property
    def text(self) -> str:
        """The plain form so far, the unsettled tail's included, from ``base`` on."""
        if self._view is None:
            # One copy of the text a call (a stream's scan after each piece), the tail's plain form joined with
            # the rest; the settled parts are joined into one only now and then.
            if len(self._parts) > 64:
                self._parts = ["".join(self._parts)]
            self._view = "".join([*self._parts, _plain_group(self._tail)] if self._tail else self._parts)
        return self._view

    @property
    def base(self) -> int:
        """Where ``text`` begins in the plain form (0 but after ``release``)."""
        return self._base

    def release(self, before: int) -> None:
        """Let go of the plain form before ``before``, which no scan will read again (a whole input's scan, a window
        at a time): ``text`` begins there on. Where each character was in the text as sent is kept (``original``)."""
        before = min(before, self._length)
        if before <= self._base:
            return
        parts, at, dropped = self._parts, self._base, 0
        while dropped < len(parts) and at + len(parts[dropped]) <= before:
            at += len(parts[dropped])
            dropped += 1
        del parts[:dropped]
        if parts and at < before:
            parts[0] = parts[0][before - at :]
            at = before
        self._base = at
        self._view = None

    @property
    def settled(self) -> int:
        """How much of ``text`` no later piece can change: a scan resumes from here (less its overlap)."""
        return self._length

    def add(self, piece: str) -> None:
        self._view = None
        text = self._tail + piece
        if text.isascii():
            self._settle(text[:-1], plain=True)
            self._tail = text[-1:]
            return
        joins = _plain_form().joins
        cut = len(text)
        while cut > 0 and len(text) - cut <= _TAIL_CHARS and text[cut - 1] in joins:
            cut -= 1
        if cut > 0 and len(text) - cut <= _TAIL_CHARS:
            cut -= 1  # the last character itself
        elif cut > 0:
            cut = len(text)  # a long run of marks: taken as it stands
        self._settle(text[:cut], plain=False)
        self._tail = text[cut:]

    def close(self) -> None:
        """The end of the text: its last character is settled too."""
        self._view = None
        tail, self._tail = self._tail, ""
        self._settle(tail, plain=tail.isascii())

    def original(self, position: int) -> int:
        """Where the character at ``position`` of ``text`` is in the text as sent."""
        if position >= self._length:
            return self._taken + min(position - self._length, len(self._tail))
        run = bisect_right(self._runs_at, position) - 1
        if run >= 0 and position < self._runs[run][0]:
            _, begin, text = self._runs[run]
            return begin + _original_in(text, position - self._runs_at[run])
        return position + self._shift[bisect_right(self._at, position) - 1]

    def _settle(self, text: str, *, plain: bool) -> None:
        if not text:
            return
        if plain:
            self._keep(text)
            return
        form = _plain_form()
        kept = 0
        for match in form.changing.finditer(text):
            begin, end = match.span()
            if begin > kept and text[begin] in form.joins:
                begin -= 1  # the character its mark belongs to
            self._keep(text[kept:begin])
            run = text[begin:end]
            plain = _plain_group(run) if len(run) < 64 else _plain(run)
            if plain == run:
                self._keep(plain)
            else:
                self._change(run, plain)
            kept = end
        self._keep(text[kept:])

    def _keep(self, text: str) -> None:
        self._parts.append(text)
        self._length += len(text)
        self._taken += len(text)

    def _change(self, run: str, plain: str) -> None:
        self._runs_at.append(self._length)
        self._runs.append((self._length + len(plain), self._taken, run))
        self._parts.append(plain)
        self._length += len(plain)
        self._taken += len(run)
        shift = self._taken - self._length
        if self._at[-1] == self._length:
            self._shift[-1] = shift
        elif self._shift[-1] != shift:
            self._at.append(self._length)
            self._shift.append(shift)


def _original_in(run: str, position: int) -> int:
    """Where in ``run`` (as sent) the character at ``position`` of its plain form comes from: the character,
    with its marks, whose plain form holds it."""
    joins = _plain_form().joins
    begin = plain = 0
    for end in range(1, len(run) + 1):
        if end == len(run) or run[end] not in joins:
            plain += len(_plain_group(run[begin:end]))
            if position < plain:
                return begin
            begin = end
    return len(run) - 1


def plain_form(text: str) -> str:
    """``text`` as a block-list reads it (``PlainText``)."""
    return text if text.isascii() else PlainText(text).text


class Blocklist:
    """The compiled entries of one policy. ``scan`` returns the first hit in a text: its entry's line number and
    its character offset, never the matched words. Words and phrases are compiled in their plain form, and every
    text is read in it (``PlainText``)."""

    def __init__(self, text: str) -> None:
        entries = list(blocklist_entries(text))
        words = [(line, _plain_entry(value)) for line, value, is_pattern in entries if not is_pattern]
        words = [(line, value) for line, value in words if value]  # nothing visible left: it would match anywhere
        self._patterns = [(line, _re2_compile(value)) for line, value, is_pattern in entries if is_pattern]
        self._words_by_line = words
        self._line_of_word = {_folded(value): line for line, value in words}
        # An entry's edge in a script written without spaces between words (Thai, Chinese...) needs no word boundary
        # there: the text's words run into one another, so the entry is matched inside a longer run.
        edges: dict[tuple[bool, bool], list[str]] = {}
        for _, value in words:
            edge = (_UNSPACED.match(value[0]) is None, _UNSPACED.match(value[-1]) is None)
            edges.setdefault(edge, []).append(value)
        self._spaced = tuple(edges.pop((True, True), ()))
        self._words = _words_regex(self._spaced) if self._spaced else None
        self._words_beside: re.Pattern[str] | None = None  # compiled when a text first holds those scripts
        self._unspaced = [_words_regex(tuple(values), *edge, beside=True) for edge, values in sorted(edges.items())]
        longest = max((len(value) for _, value in words), default=0) + 1
        self.overlap = max(longest, PATTERN_OVERLAP_CHARS if self._patterns else 0)

    def __bool__(self) -> bool:
        return self._words is not None or bool(self._unspaced) or bool(self._patterns)

    def scan(self, text: str, *, final: bool = True) -> Hit | None:
        """The first entry found in ``text``. Not ``final`` (a stream's text so far), a match that reaches the end
        of ``text`` is not counted yet: the next word may still make it part of a longer one."""
        return self.scan_open(PlainText(text, whole=final), final=final)[0]

    async def scan_whole(self, text: str) -> Hit | None:
        """The first entry found anywhere in ``text`` (a request's input, up to the body limit), read a window
        of ``SCAN_LIMIT_CHARS`` at a time: each window re-reads the last ``overlap`` characters of the one
        before, so a word across their seam is found, and the event loop is given back between windows, so a
        long input delays other requests by one window's scan at most. A single scan of the tail let a
        blocked word through ahead of 200,000 characters of padding. The windows are of the plain form, which
        is itself taken a window of the text at a time: a character that grows in it (U+FDFA is 18 characters)
        cannot push a word out of a window, nor invisible characters stretch one beyond the overlap."""
        plain = PlainText(whole=False)
        scanned = 0  # plain characters read
        for begin in range(0, len(text), SCAN_LIMIT_CHARS):
            # What the next scan reads begins ``overlap`` before what was read, and a word there may reach as far
            # back again (``_lookalikes_read``): the rest is let go of, so that neither memory nor the copies of the
            # plain form grow with the input (U+FDFA is 18 characters in it).
            plain.release(scanned - 2 * self.overlap - 1)
            plain.add(text[begin : begin + SCAN_LIMIT_CHARS])
            whole = begin + SCAN_LIMIT_CHARS >= len(text)
            if whole:
                plain.close()
            length = plain.base + len(plain.text)
            while True:
                start = max(0, scanned - self.overlap)
                end = min(length, start + SCAN_LIMIT_CHARS)
                last = whole and end == length
                hit, _ = self.scan_open(plain, start=start, end=end, final=last)
                if hit is not None or last:
                    return hit
                scanned = min(end, plain.settled)
                await asyncio.sleep(0)
                if end == length:
                    break
        return None

    def scan_open(
        self, plain: PlainText, *, start: int = 0, end: int | None = None, final: bool = True
    ) -> tuple[Hit | None, bool]:
        """The first entry found in ``plain.text[start:end]`` (a hit names its character in the text as sent), and
        whether a match reaching ``end`` was left for the next scan (not ``final``): the text so far may end in a
        hit, so a stream must not relay it yet. The next scan re-reads it (its overlap covers the longest word)."""
        text, base = plain.text, plain.base
        end = base + len(text) if end is None else min(end, base + len(text))  # as if the text ended there (no copy)
        if end - start > SCAN_LIMIT_CHARS:
            start = end - SCAN_LIMIT_CHARS
        # Where ``text`` begins in the plain form: the look-alikes of other scripts in a word that mixes them with
        # Latin letters are read as those, in a copy of the part read when there are any.
        text, shift = _lookalikes_read(text, start - base, end - base, self.overlap)
        shift += base
        start, end = start - shift, end - shift
        found: tuple[int, int] | None = None  # (offset, entry line)
        open_at_end = False
        # (From the character before the window: a match's boundary reads it.)
        # RE2's bindings encode the whole text they are handed to UTF-8 at each call (and measure it to ``start``):
        # the patterns are handed the window read, with the character before it that a boundary reads, a copy.
        lo = max(0, start - 1)
        window: str | None = None
        for line, regex in self._matchers(beside=_UNSPACED.search(text, lo, end) is not None):
            if line is None:
                matches, offset = regex.finditer(text, start, end), 0
            else:
                window = text[lo:end] if window is None else window
                matches, offset = regex.finditer(window, start - lo), lo
            for match in matches:
                if not final and match.end() + offset >= end:
                    open_at_end = True
                    continue
                if line is None:
                    line = self._line_of_word.get(_folded(match.group())) or self._line_matching(match.group())
                if found is None or match.start() + offset < found[0]:
                    found = (match.start() + offset, line)
                break
        if found is None:
            return None, open_at_end
        at = plain.original(found[0] + shift)
        return Hit(("blocklist",), f"entry {found[1]} at character {at}", entry=found[1], at=at), open_at_end

    def _line_matching(self, found: str) -> int:
        """The entry of a word found whose folded form is not the entry's: ``re.IGNORECASE`` matches "İ" (dotted
        capital I) to "i", whose case folds differ. Rare, and only on a hit: each entry is tried in turn."""
        for line, value in self._words_by_line:
            if re.fullmatch(_word_pattern(value), found, re.IGNORECASE):
                return line
        return 0

    def _matchers(self, *, beside: bool = False) -> Iterator[tuple[int | None, Any]]:
        """The compiled entries; ``beside``: the text holds letters of a script written without spaces, which a word
        may stand against."""
        if self._words is not None:
            if beside and self._words_beside is None:
                self._words_beside = _words_regex(self._spaced, beside=True)
            yield None, self._words_beside if beside else self._words
        for words in self._unspaced:
            yield None, words
        yield from self._patterns


def _plain_entry(value: str) -> str:
    """A word or phrase in its plain form, its words one space apart, read as a text is (its look-alikes of other
    scripts in a word that mixes them with Latin letters as those letters); empty when nothing visible is left."""
    value = " ".join(plain_form(value).split())
    return _lookalikes_read(value, 0, len(value), len(value))[0]


# In a pattern, what is not a literal run of letters: an escape (``\b``, ``\pL``, ``\x{43e}``) or a character class
# (``[оo]`` lists a letter of each script on purpose). Blanked before a pattern's look-alikes are looked for.
_PATTERN_NOT_LITERAL = re.compile(
    r"\\(?:[pP](?:\{[^}]*\}|.)|x(?:\{[^}]*\}|[0-9A-Fa-f]{0,2})|.)"  # an escape
    r"|\[\^?\]?(?:\\.|[^\]\\])*\]",  # a character class
    re.S,
)


def pattern_plain(value: str) -> str:
    """A ``re:`` pattern as it must be written to match the text a scan reads: in the plain form, and with a
    Cyrillic or Greek look-alike in a literal run that mixes it with Latin letters (``fоrbid``) written as the Latin
    letter, since the text's such words are read so (the pattern would never match them). Escapes and character
    classes are left as they are (``\\bсор\\b`` is a Russian word between boundaries, ``с[оo]р`` either spelling)."""
    value = plain_form(value)
    if _HAS_LOOKALIKE.search(value) is None:
        return value
    probe = _PATTERN_NOT_LITERAL.sub(lambda match: " " * len(match.group()), value)
    mixed = [word.span() for word in _MIXED_WORD.finditer(probe)]
    if not mixed:
        return value
    pieces: list[str] = []
    kept = 0
    for begin, end in mixed:
        pieces += (value[kept:begin], value[begin:end].translate(_LOOKALIKES))
        kept = end
    pieces.append(value[kept:])
    return "".join(pieces)


def _folded(value: str) -> str:
    return " ".join(value.split()).casefold()


def _word_pattern(value: str) -> str:
    return r"\s+".join(re.escape(part) for part in value.split())


@functools.lru_cache(maxsize=64)
def _words_regex(
    values: tuple[str, ...], left: bool = True, right: bool = True, *, beside: bool = False
) -> re.Pattern[str]:
    r"""Words and phrases (plain forms, their words one space apart) as one case-insensitive regular expression
    that finds them as whole words, ``(?<!\w)(?:...)(?!\w)``, at each position the longest that is whole (a
    phrase wins over the word it begins with; "kill" is found in "kill the killers").

    The alternatives are a trie: ``re`` tries a flat alternation's entries one by one at every position of the
    text, so 1,000 words cost as much as 1,000 scans (about 1.2 s per 100,000 characters at 10,000 words), where
    the trie follows the one path the text spells. Its branches are keyed by the case class ``re`` matches a
    character by, so that no two branches match the same character of a text (``k`` and the Kelvin sign ``K``,
    ``s`` and ``ſ`` share one): the first whole match found is then the longest, as it was with the alternation
    sorted longest first. Kept by the values, as ``re`` keeps a compiled pattern: a policy's snapshot is built
    again whenever its cached copy runs out. Without ``left`` (``right``), a match needs no word boundary before (after)
    it: entries that begin (end) in a script written without spaces. With ``beside``, a letter of such a script beside
    a match is no word's letter: a Latin word written against Chinese is whole (the text holds such letters)."""
    trie: dict[str, Any] = {}
    for value in values:
        node = trie
        for character in value:
            node = node.setdefault(_case_class(character), [character, {}])[1]
        node[""] = value
    # ``beside``: the entries' first letters are looked at before what stands before them (most places of a text begin
    # no entry, and a letter is tested at the speed of one table where the class of what may stand beside a word is
    # not); a text without those scripts is read with ``\w`` alone, as fast as before they were.
    if beside:
        firsts = "[" + "".join(re.escape(character) for character, _ in trie.values()) + "]"
        before, after = f"(?={firsts})(?<!{_WORD_BESIDE})" if left else "", f"(?!{_WORD_BESIDE})" if right else ""
    else:
        before, after = "(?<!\\w)" if left else "", "(?!\\w)" if right else ""
    return re.compile(f"{before}{_trie_pattern(trie, 0)}{after}", re.IGNORECASE)


@functools.cache
def _case_class(character: str) -> str:
    """What ``re.IGNORECASE`` matches ``character`` by, as one character: ``character`` itself when it has no case
    (a phrase's space among them), else its class of simple lower cases, which a text's character is matched by.
    These are ``re``'s own tables (CPython's ``_sre`` and ``re._casefix``, private): ``str.lower`` and ``casefold``
    are not what ``re`` compares (``İ`` matches ``i``, ``ſ`` matches ``s``). The trie's property test, against the
    flat alternation, would show a Python whose ``re`` compares otherwise."""
    code = ord(character)
    if not _sre.unicode_iscased(code):
        return character
    lower = _sre.unicode_tolower(code)
    return chr(min((lower, *_EXTRA_CASES.get(lower, ()))))


def _trie_pattern(node: dict[str, Any], depth: int) -> str:
    if depth >= _TRIE_DEPTH:  # the rest of each deeper entry (long phrases alike this far), longest first
        rests = sorted((value[depth:] for value in _trie_values(node)), key=len, reverse=True)
        return "(?:" + "|".join(map(_literal_pattern, rests)) + ")"
    branches = []
    for key, item in node.items():
        if not key:
            continue
        characters, (character, child) = [], item
        while True:  # a run of characters that no entry ends in or branches at is one literal
            characters.append(character)
            depth_then = depth + len(characters)
            if len(child) != 1 or "" in child or depth_then >= _TRIE_DEPTH:
                break
            ((character, child),) = child.values()
        branches.append(_literal_pattern("".join(characters)) + _trie_pattern(child, depth_then))
    if not branches:
        return ""
    if "" in node:  # an entry ends here: the longer ones first (greedy), then this one
        return "(?:" + "|".join(branches) + ")?"
    return branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"


def _trie_values(node: dict[str, Any]) -> Iterator[str]:
    """The entries at and below ``node`` (without recursion: a phrase may be long)."""
    stack = [node]
    while stack:
        node = stack.pop()
        for key, item in node.items():
            if key:
                stack.append(item[1])
            else:
                yield item


def _literal_pattern(value: str) -> str:
    """A plain entry, or part of one, as a regular expression: any whitespace where it has a space."""
    return r"\s+".join(map(re.escape, value.split(" ")))


def blocklist_entries(text: str) -> Iterator[tuple[int, str, bool]]:
    """(line number, entry, is a pattern) for each non-blank line; ``#`` starts a comment line."""
    for number, raw in enumerate((text or "").splitlines(), start=1):
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        if entry.startswith(PATTERN_PREFIX):
            yield number, entry[len(PATTERN_PREFIX) :].strip(), True
        else:
            yield number, entry, False


def _re2_options() -> re2.Options:
    options = re2.Options()
    options.case_sensitive = False
    options.log_errors = False  # a refused pattern is the admin's form error, not a line on stderr
    return options


_RE2_OPTIONS = _re2_options()


def _re2_compile(value: str) -> Any:
    """A ``re:`` entry as RE2 matches it: case-insensitive, linear in the text."""
    return re2.compile(value, _RE2_OPTIONS)


def blocklist_problems(text: str) -> list[str]:
    """Why a block-list cannot be saved (an empty list: it can): a pattern RE2 does not take (look-arounds and
    back-references among them), one that matches the empty string, or one too long; too many entries."""
    problems: list[str] = []
    entries = list(blocklist_entries(text))
    if len(entries) > MAX_ENTRIES:
        problems.append(f"At most {MAX_ENTRIES} entries (this list has {len(entries)}).")
    for line, value, is_pattern in entries:
        if not is_pattern:
            if not _plain_entry(value):
                problems.append(
                    f"Line {line}: only invisible characters or accents, which the block-list ignores in a text."
                )
            continue
        if not value:
            problems.append(f"Line {line}: an empty pattern.")
            continue
        if pattern_plain(value) != value:
            problems.append(
                f"Line {line}: a pattern is matched against the plain form of a text (full-width letters, ligatures "
                f"and other compatibility forms mapped to their plain letters, accents and other marks added to "
                f"letters and invisible characters left out, Cyrillic and Greek letters drawn like Latin ones read "
                f"as those in a word with Latin letters): write it in that form (re:{pattern_plain(value)})."
            )
            continue
        if len(value) > MAX_PATTERN_CHARS:
            problems.append(f"Line {line}: a pattern of at most {MAX_PATTERN_CHARS} characters.")
            continue
        try:
            compiled = _re2_compile(value)
        except re2.error as exc:
            reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else exc
            problems.append(
                f"Line {line}: not a regular expression the matcher takes ({reason}). It is RE2's syntax, "
                "linear in time: no look-arounds and no back-references; \\w, \\d and \\b are ASCII (\\pL is "
                "any letter)."
            )
            continue
        if compiled.match(""):
            problems.append(f"Line {line}: the pattern matches empty text, so it would match everything.")
    return problems


def blocklist_unmatchable(text: str) -> list[tuple[int, str, str]]:
    """The ``re:`` patterns of a saved block-list that are not in the plain form, as (line, pattern, the pattern in
    the plain form, ``pattern_plain``): saved before the plain form dropped accents and folded ``ß``, or before a
    look-alike in a Latin run was refused (5 December), they can never match the letters the plain form took out of
    the text. ``blocklist_problems`` refuses them on the next save;
    the admin flags those already saved."""
    return [
        (line, value, pattern_plain(value))
        for line, value, is_pattern in blocklist_entries(text)
        if is_pattern and value and pattern_plain(value) != value
    ]


@dataclass(frozen=True, slots=True)
class PolicySnapshot:
    """A ``ModerationPolicy`` as the request path uses it, with its block-list compiled."""

    id: int
    name: str
    checker: str
    action: str
    check_input: bool
    check_output: bool
    stream_interval_chars: int
    fail_open: bool
    timeout_seconds: float
    blocklist: Blocklist | None = None
    provider: ProviderConfig | None = None
    model: str = ""
    categories: frozenset[str] = frozenset()

    @property
    def blocks(self) -> bool:
        return self.action == ModerationAction.BLOCK

    @property
    def is_blocklist(self) -> bool:
        return self.checker == ModerationChecker.BLOCKLIST

    async def check(self, text: str) -> Hit | None:
        """The policy's verdict on ``text``; ``ModerationServiceError`` when the service gives none."""
        if self.is_blocklist:
            return await self.blocklist.scan_whole(text) if self.blocklist else None
        return await self.ask_service(text)

    async def ask_service(self, text: str) -> Hit | None:
        """The moderation service's verdict on all of ``text``, sent as ``service_inputs`` (of a size the service
        reads whole), ``OPENAI_INPUTS_PER_CALL`` a call, ``OPENAI_CALLS_AT_ONCE`` calls at a time, all within the
        policy's timeout from now: one deadline for the whole check, each call and its 429 retries within it, so
        the policy decides within ``timeout_seconds`` however many calls the text takes (each call had its own
        timeout until 7 December 2026: a long input's 9 rounds of calls could take 9 times it). The first flag
        found is the verdict (the calls still out are cancelled: whatever else they find, the text is flagged); a
        call that fails, or the deadline passing, fails the whole (the policy decides)."""
        if self.provider is None:
            raise ModerationServiceError(f"the policy {self.name!r} names no moderation provider")
        deadline = asyncio.get_running_loop().time() + self.timeout_seconds
        inputs = service_inputs(text)
        calls = iter([inputs[at : at + OPENAI_INPUTS_PER_CALL] for at in range(0, len(inputs), OPENAI_INPUTS_PER_CALL)])
        pending = {
            asyncio.ensure_future(self._ask_call(batch, deadline))
            for batch in itertools.islice(calls, OPENAI_CALLS_AT_ONCE)
        }
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                # Every finished call is read, a flag first: a failure read first must not leave the others'
                # exceptions unretrieved (asyncio logs each at collection), nor hide a flag found beside it.
                failures = [task.exception() for task in done]
                for task, failure in zip(done, failures, strict=True):
                    if failure is None and (hit := task.result()) is not None:
                        return hit
                for failure in failures:
                    if failure is not None:
                        raise failure
                pending |= {
                    asyncio.ensure_future(self._ask_call(batch, deadline))
                    for batch in itertools.islice(calls, len(done))
                }
            return None
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def _ask_call(self, inputs: list[str], deadline: float) -> Hit | None:
        """One call to the service about ``inputs`` (one input sent as a string), answered by ``deadline`` (the
        check's, on the loop's clock: ``ask_service``), its 429s asked again before it (``_moderate``)."""
        try:
            async with asyncio.timeout_at(deadline):
                results = await self._moderate(inputs[0] if len(inputs) == 1 else inputs, deadline)
        except TimeoutError:
            raise ModerationServiceError(f"no answer within {self.timeout_seconds:g} seconds") from None
        except ProviderError as exc:
            raise ModerationServiceError(exc.message) from None
        if isinstance(results, list) and len(results) != len(inputs):  # an input without its verdict went unread
            raise ModerationServiceError(
                f"the moderation service answered {len(results)} results for {len(inputs)} inputs"
            )
        return hit_from_results(results, self.categories)

    async def _moderate(self, given: str | list[str], deadline: float) -> Any:
        """The service's results for ``given``; a 429 asked again (``OPENAI_RATE_LIMIT_RETRIES``) while the wait
        fits before ``deadline``. Any other failure, and an exhausted quota (no wait helps), as they come."""
        adapter, loop = adapter_for(self.provider), asyncio.get_running_loop()
        retry = 0
        while True:
            try:
                return await adapter.moderate(given, model=self.model)
            except ProviderRateLimitError as exc:
                retry += 1
                if isinstance(exc, ProviderQuotaExhaustedError) or retry > OPENAI_RATE_LIMIT_RETRIES:
                    raise
                wait = exc.retry_after
                if wait is None:
                    ceiling = OPENAI_RATE_LIMIT_BACKOFF_SECONDS * 2 ** (retry - 1)
                    wait = random.uniform(0, min(ceiling, OPENAI_RATE_LIMIT_BACKOFF_CAP_SECONDS))  # noqa: S311
                if loop.time() + wait >= deadline:
                    raise
                await asyncio.sleep(wait)


def service_inputs(text: str) -> list[str]:
    """``text`` as the inputs the moderation service is sent: pieces of at most ``OPENAI_INPUT_CHARS``
    characters, each re-reading the last ``OPENAI_SEAM_CHARS`` of the one before."""
    if len(text) <= OPENAI_INPUT_CHARS:
        return [text]
    step = OPENAI_INPUT_CHARS - OPENAI_SEAM_CHARS
    return [text[at : at + OPENAI_INPUT_CHARS] for at in range(0, len(text) - OPENAI_SEAM_CHARS, step)]


def hit_from_results(results: Any, wanted: frozenset[str]) -> Hit | None:
    """The flagged categories of OpenAI ``results`` (those in ``wanted``, when it names any)."""
    if not isinstance(results, list) or not results:
        raise ModerationServiceError("the moderation service answered without results")
    flagged: list[str] = []
    for result in results:
        if not isinstance(result, dict) or not isinstance(result.get("categories"), dict):
            raise ModerationServiceError("the moderation service answered in an unknown shape")
        for name, on in result["categories"].items():
            if on is True and (not wanted or name in wanted) and name not in flagged:
                flagged.append(name)
    return Hit(tuple(flagged)) if flagged else None


def policy_snapshot(row: ModerationPolicy, provider: Provider | None) -> PolicySnapshot:
    categories = row.categories if isinstance(row.categories, list) else []
    return PolicySnapshot(
        id=row.pk,
        name=row.name,
        checker=row.checker,
        action=row.action,
        check_input=row.check_input,
        check_output=row.check_output,
        stream_interval_chars=max(1, row.stream_interval_chars),
        fail_open=row.fail_open,
        timeout_seconds=float(row.timeout_seconds or Decimal("5")),
        blocklist=Blocklist(row.blocklist) if row.checker == ModerationChecker.BLOCKLIST else None,
        provider=provider_config(provider) if provider is not None else None,
        model=row.moderation_model or "omni-moderation-latest",
        categories=frozenset(str(c) for c in categories),
    )


# Snapshots by policy id (None: no such policy, or disabled), cleared when a policy or provider is saved.
policy_cache: TTLCache[PolicySnapshot | None] = TTLCache("moderation-policies")


async def _load_policy(policy_id: int) -> PolicySnapshot | None:
    row = await ModerationPolicy.objects.select_related("moderation_provider").filter(pk=policy_id).afirst()
    if row is None or not row.enabled:
        return None
    return policy_snapshot(row, row.moderation_provider)


async def moderation_policies(ids: tuple[int | None, ...]) -> list[PolicySnapshot]:
    """The enabled policies among ``ids`` (each once), cached in-process."""
    policies: list[PolicySnapshot] = []
    for policy_id in dict.fromkeys(ids):
        if policy_id is None:
            continue
        policy = await policy_cache.get_or_load(policy_id, lambda pid=policy_id: _load_policy(pid))
        if policy is not None:
            policies.append(policy)
    return policies


@receiver([post_save, post_delete], sender=ModerationPolicy)
@receiver([post_save, post_delete], sender=Provider)
def _policy_changed(**kwargs: Any) -> None:
    # Again after commit: a request that reads a policy in between still sees it as it was.
    forget_now_and_after_commit(policy_cache.invalidate)
