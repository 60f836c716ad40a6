"""Moderation policies as the request path reads them: cached snapshots, the block-list matcher and the
OpenAI checker. ``chat.moderation`` decides what a finding does to a request (refuse, cut, record).

The block-list is compiled once per policy version (the snapshot is rebuilt when the row is saved): words
and phrases become one case-insensitive alternation matched as whole words, ``re:`` entries are compiled
one by one. Python's ``re`` has no time limit, so a pattern is vetted when it is saved
(``blocklist_problems``: no nested or adjacent unbounded quantifiers, no back-references, a length cap) and
the text it runs over is capped (``SCAN_LIMIT_CHARS``), which together keep a scan linear in practice.
"""

from __future__ import annotations

import asyncio
import re
import re._constants as sre_constants  # the parsed form of a pattern: what ``blocklist_problems`` inspects
import re._parser as sre_parse
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

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

_ADJACENT_UNBOUNDED = re.compile(r"(?:\.|\\[wWsSdD]|\[[^\]]*\])[+*]\??(?:\.|\\[wWsSdD]|\[[^\]]*\])[+*]")
_BACKREFERENCE = re.compile(r"\\[1-9]|\(\?P=")


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
        self._patterns = [(line, re.compile(value, re.IGNORECASE)) for line, value, is_pattern in entries if is_pattern]
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
        if len(text) - start > SCAN_LIMIT_CHARS:
            start = len(text) - SCAN_LIMIT_CHARS
        found: tuple[int, int] | None = None  # (offset, entry line)
        for line, regex in self._matchers():
            for match in regex.finditer(text, start):
                if not final and match.end() >= len(text):
                    continue
                if line is None:
                    line = self._line_of_word.get(_folded(match.group()), 0)
                if found is None or match.start() < found[0]:
                    found = (match.start(), line)
                break
        if found is None:
            return None
        return Hit(("blocklist",), f"entry {found[1]} at character {found[0]}")

    def _matchers(self) -> Iterator[tuple[int | None, re.Pattern[str]]]:
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


def blocklist_problems(text: str) -> list[str]:
    """Why a block-list cannot be saved (an empty list: it can): a pattern that does not compile, matches
    the empty string, or risks catastrophic backtracking (nested or adjacent unbounded quantifiers,
    back-references), or one too long; too many entries."""
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
            compiled = re.compile(value, re.IGNORECASE)
        except re.error as exc:
            problems.append(f"Line {line}: not a regular expression ({exc}).")
            continue
        if compiled.match(""):
            problems.append(f"Line {line}: the pattern matches empty text, so it would match everything.")
        elif _BACKREFERENCE.search(value):
            problems.append(f"Line {line}: back-references are not allowed (they can take exponential time).")
        elif problem := _backtracking_problem(value):
            problems.append(f"Line {line}: {problem}")
    return problems


_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def _backtracking_problem(value: str) -> str | None:
    """Why the (compiling) pattern ``value`` could backtrack for a very long time, or None. Read from its
    parsed form, so that an extra group or a factored alternation does not hide a repetition:

    - a repetition inside a repetition, either unbounded (``(a+)+``, ``((a+))+``, ``(x(?:a+)y?)*``);
    - an unbounded repetition of an alternation (``(a|aa)+``: the alternatives can split a text many ways);
    - adjacent unbounded repetitions (``.*.*``), or more than one unbounded repetition of anything but
      whitespace (``a.*b.*c``: polynomial, minutes on a few thousand characters)."""
    if _ADJACENT_UNBOUNDED.search(value):
        return _NESTED
    unbounded = 0

    def walk(items: Any, inside_repeat: bool, inside_unbounded: bool) -> str | None:
        nonlocal unbounded
        for op, av in items:
            if op in _REPEATS:
                _low, high, body = av
                is_unbounded = high == sre_constants.MAXREPEAT
                repeats = high > 1
                if repeats and (inside_unbounded or (inside_repeat and is_unbounded)):
                    return _NESTED
                if is_unbounded:
                    if _has_branch(body):
                        return (
                            "an unbounded repeated alternation (like (a|aa)+) can take exponential time on some "
                            "texts; rewrite it without."
                        )
                    if not _is_whitespace(body):
                        unbounded += 1
                found = walk(body, inside_repeat or repeats, inside_unbounded or (repeats and is_unbounded))
            else:
                found = None
                for child in _children(op, av):
                    found = found or walk(child, inside_repeat, inside_unbounded)
            if found:
                return found
        return None

    found = walk(sre_parse.parse(value), False, False)
    if found:
        return found
    if unbounded > 1:
        return (
            "more than one unbounded repetition (like a.*b.*c) can take polynomial time on a long text; keep one, "
            "or bound the others (.{0,40})."
        )
    return None


_NESTED = (
    "nested or adjacent unbounded repetition (like (a+)+ or .*.*) can take exponential time on some texts; "
    "rewrite it without."
)


def _children(op: Any, av: Any) -> list[Any]:
    """The sub-patterns under one parsed node (groups, alternatives, look-arounds, conditionals)."""
    if op is sre_constants.SUBPATTERN:
        return [av[3]]
    if op is sre_constants.BRANCH:
        return list(av[1])
    if op is sre_constants.ATOMIC_GROUP:
        return [av]
    if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
        return [av[1]]
    if op is sre_constants.GROUPREF_EXISTS:
        return [branch for branch in av[1:] if branch is not None]
    return []


def _has_branch(items: Any) -> bool:
    for op, av in items:
        if op is sre_constants.BRANCH:
            return True
        children = [av[2]] if op in _REPEATS else _children(op, av)
        if any(_has_branch(child) for child in children):
            return True
    return False


def _is_whitespace(items: Any) -> bool:
    """``\\s`` alone: it cannot overlap the words around it, so ``credit\\s+card\\s+number`` stays linear."""
    return list(items) == [(sre_constants.IN, [(sre_constants.CATEGORY, sre_constants.CATEGORY_SPACE)])]


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
            return self.blocklist.scan(text) if self.blocklist else None
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
