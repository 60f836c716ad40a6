"""Moderation policies as the request path reads them: cached snapshots, the block-list matcher and the
OpenAI checker. ``chat.moderation`` decides what a finding does to a request (refuse, cut, record).

The block-list is compiled once per policy version (the snapshot is rebuilt when the row is saved): words
and phrases become one case-insensitive alternation of literals matched as whole words (Python's ``re``: an
alternation of escaped literals cannot backtrack), and ``re:`` entries are compiled one by one with RE2
(``google-re2``, Google's bindings), whose matching time is linear in the text whatever the pattern. Python's
``re`` has no time limit, and a vet of a pattern's shape cannot make it linear: ``a.*c`` took about a minute
on 200,000 characters, with the event loop stalled the while. RE2 has no look-arounds or back-references, so a
pattern that needs them is refused when saved (``blocklist_problems``), with one that matches empty text or is
too long. The text one scan reads is still capped (``SCAN_LIMIT_CHARS``): a whole input is read a window at a
time (``Blocklist.scan_whole``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import re2
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from core.cache import TTLCache

from .adapters import adapter_for
from .exceptions import ProviderError
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
# The OpenAI checker sees at most the last this many characters of a reply (its API's own input limit
# is far larger, but the cost of a check grows with it).
OPENAI_INPUT_CHARS = 32_000


class ModerationServiceError(Exception):
    """The moderation service could not give an answer (down, refused, too slow, nonsense)."""


@dataclass(frozen=True, slots=True)
class Hit:
    """What a checker found: categories (``blocklist`` for the block-list) and where, never the content."""

    categories: tuple[str, ...]
    where: str = ""

    def describe(self) -> str:
        return ", ".join(self.categories) + (f" ({self.where})" if self.where else "")


class Blocklist:
    """The compiled entries of one policy. ``scan`` returns the first hit in ``text[start:]``: its entry's
    line number and its character offset, never the matched words."""

    def __init__(self, text: str) -> None:
        entries = list(blocklist_entries(text))
        words = [(line, value) for line, value, is_pattern in entries if not is_pattern]
        self._patterns = [(line, _re2_compile(value)) for line, value, is_pattern in entries if is_pattern]
        self._words_by_line = words
        self._line_of_word = {_folded(value): line for line, value in words}
        # Longest first, so that a phrase wins over a word it begins with.
        alternatives = "|".join(_word_pattern(value) for _, value in sorted(words, key=lambda w: -len(w[1])))
        self._words = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE) if words else None
        longest = max((len(value) for _, value in words), default=0) + 1
        self.overlap = max(longest, PATTERN_OVERLAP_CHARS if self._patterns else 0)

    def __bool__(self) -> bool:
        return self._words is not None or bool(self._patterns)

    def scan(self, text: str, *, start: int = 0, final: bool = True) -> Hit | None:
        """The first entry found in ``text`` from ``start``. Not ``final`` (a stream's text so far), a match
        that reaches the end of ``text`` is not counted yet: the next word may still make it part of a longer
        one; the next scan re-reads it (its overlap covers the longest word)."""
        return self.scan_open(text, start=start, final=final)[0]

    async def scan_whole(self, text: str) -> Hit | None:
        """The first entry found anywhere in ``text`` (a request's input, up to the body limit), read a window
        of ``SCAN_LIMIT_CHARS`` at a time: each window re-reads the last ``overlap`` characters of the one
        before, so a word across their seam is found, and the event loop is given back between windows, so a
        long input delays other requests by one window's scan at most. A single scan of the tail let a
        blocked word through ahead of 200,000 characters of padding."""
        start = 0
        while True:
            end = min(len(text), start + SCAN_LIMIT_CHARS)
            hit = self.scan(text[:end] if end < len(text) else text, start=start, final=end == len(text))
            if hit is not None or end == len(text):
                return hit
            start = end - self.overlap
            await asyncio.sleep(0)

    def scan_open(self, text: str, *, start: int = 0, final: bool = True) -> tuple[Hit | None, bool]:
        """``scan``, and whether a match reaching the end of ``text`` was left for the next scan (not
        ``final``): the text so far may end in a hit, so a stream must not relay it yet."""
        if len(text) - start > SCAN_LIMIT_CHARS:
            start = len(text) - SCAN_LIMIT_CHARS
        found: tuple[int, int] | None = None  # (offset, entry line)
        open_at_end = False
        for line, regex in self._matchers():
            for match in regex.finditer(text, start):
                if not final and match.end() >= len(text):
                    open_at_end = True
                    continue
                if line is None:
                    line = self._line_of_word.get(_folded(match.group())) or self._line_matching(match.group())
                if found is None or match.start() < found[0]:
                    found = (match.start(), line)
                break
        if found is None:
            return None, open_at_end
        return Hit(("blocklist",), f"entry {found[1]} at character {found[0]}"), open_at_end

    def _line_matching(self, found: str) -> int:
        """The entry of a word found whose folded form is not the entry's: ``re.IGNORECASE`` matches "İ" (dotted
        capital I) to "i", whose case folds differ. Rare, and only on a hit: each entry is tried in turn."""
        for line, value in self._words_by_line:
            if re.fullmatch(_word_pattern(value), found, re.IGNORECASE):
                return line
        return 0

    def _matchers(self) -> Iterator[tuple[int | None, Any]]:
        if self._words is not None:
            yield None, self._words
        yield from self._patterns


def _folded(value: str) -> str:
    return " ".join(value.split()).casefold()


def _word_pattern(value: str) -> str:
    return r"\s+".join(re.escape(part) for part in value.split())


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
            continue
        if not value:
            problems.append(f"Line {line}: an empty pattern.")
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
        if self.provider is None:
            raise ModerationServiceError(f"the policy {self.name!r} names no moderation provider")
        try:
            async with asyncio.timeout(self.timeout_seconds):
                results = await adapter_for(self.provider).moderate(text[-OPENAI_INPUT_CHARS:], model=self.model)
        except TimeoutError:
            raise ModerationServiceError(f"no answer within {self.timeout_seconds:g} seconds") from None
        except ProviderError as exc:
            raise ModerationServiceError(exc.message) from None
        return hit_from_results(results, self.categories)


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
    policy_cache.invalidate()
