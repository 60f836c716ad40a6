"""Moderation in the pipeline: the input check before admission, the output check on replies and streams,
and what a finding does (``docs/moderation.md``).

A request is checked by its model's policy and its user's plan's (``providers.moderation``), and a fallback's
own input policy reads the input before that fallback is tried (``Moderation.check_fallback``); a reply by the
output policies of the model that wrote it and of the plan (``Moderation.output_for``). With none,
``moderation_for`` returns None after two cached lookups and nothing else runs. A ``block`` hit refuses the
input (400 ``content_policy_violation``, nothing sent upstream) or ends the reply; a ``flag`` hit is
recorded on the ledger row (``CompletionRun.moderation``) and as an audit event ``moderation.flag``
written in the background. A moderation service that fails refuses the request (503
``moderation_unavailable``) unless the policy fails open; then the request is served and the ledger row
and a log warning say it went unchecked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar

from asgiref.sync import sync_to_async

from audit.models import ActorType
from audit.services import Actor, audit_record
from billing.models import Operation
from billing.selectors import user_limits
from providers.exceptions import ProviderBadRequestError, ProviderUnavailableError
from providers.moderation import (
    OPENAI_SEAM_CHARS,
    Hit,
    ModerationServiceError,
    PlainText,
    PolicySnapshot,
    moderation_policies,
)
from providers.tokens import REASONING_FIELDS, TOOL_CALL_BLOCKS, thinking_block_texts
from providers.types import ResolvedModel

from .callers import Caller
from .validation import InvalidRequestError

logger = logging.getLogger("llmhub.moderation")

# The operations whose text is moderated (embeddings are not: nothing is said back).
MODERATED = frozenset({Operation.CHAT, Operation.MESSAGES, Operation.RESPONSES, Operation.COMPLETIONS})
T = TypeVar("T")
# Audit writes in flight, kept referenced until done (the event loop keeps only weak references).
_background: set[asyncio.Task[Any]] = set()


class ModerationError:
    """Marks the errors moderation raises: never retried on another deployment, never held against one."""


class ContentPolicyViolationError(ModerationError, ProviderBadRequestError):
    """The input, or the reply, is refused by a moderation policy. A ``ProviderError`` so that a stream cut
    by it ends the way every entry point ends a broken stream (an in-band error, never a clean end)."""

    status_code = 400
    error_type = "invalid_request_error"
    code = "content_policy_violation"

    def __init__(self, message: str, *, moderation: str, param: str | None = None) -> None:
        super().__init__(message, code=self.code, param=param)
        self.moderation = moderation  # for the ledger row: what was found, not the text


class ModerationUnavailableError(ModerationError, ProviderUnavailableError):
    """The moderation service failed and the policy fails closed."""

    status_code = 503
    code = "moderation_unavailable"

    def __init__(self, message: str, *, moderation: str) -> None:
        super().__init__(message, code=self.code)
        self.moderation = moderation


class Moderation:
    """The policies of one request and what they found so far (``notes``: the ledger row's words)."""

    def __init__(
        self,
        policies: list[PolicySnapshot],
        *,
        caller: Caller,
        request_id: str,
        model: str,
        model_policy_id: int | None = None,
        plan_policy_id: int | None = None,
    ) -> None:
        self.policies = policies
        # The ids ``policies`` came from: the model asked for's and the plan's (``output_for``).
        self._model_policy_id = model_policy_id
        self._plan_policy_id = plan_policy_id
        self.caller = caller
        self.request_id = request_id
        self.model = model
        self.notes: list[str] = []
        self._flagged: set[tuple[int, str]] = set()  # (policy, direction) already recorded
        self._input: tuple[dict[str, Any], str, dict[str, Any]] | None = None  # what ``check_input`` read, as asked
        # A fallback's own input policy: its verdict on this input (None: passed), reached once per policy.
        self._verdicts: dict[int, Exception | None] = {}

    @property
    def summary(self) -> str:
        return "; ".join(self.notes)

    async def check_input(
        self,
        body: dict[str, Any],
        operation: str,
        *,
        fields: bool = True,
        variables: dict[str, Any] | None = None,
        field_names: dict[str, str] | None = None,
    ) -> None:
        """Before admission: raise on a ``block`` hit or a failed service that fails closed. The input is one
        text, scanned once; a block-list's hit names the field it is in (``messages[2].content``, ``system``,
        ``tools[0]``) and the character there, unless ``fields`` is off (the messages are not the client's
        list: the chat socket's new turn). ``variables``: a prompt template's run, whose messages are the
        template's text, the admin's, and are not read (an example reply naming a blocked word refused every
        run); what the caller gave is, each string of each variable (``prompt.variables.<name>``).
        ``field_names``: the names the client gave those fields, when ``body`` is a translation of its request
        (``/v1/responses``: ``messages[1].content`` was ``input[0].content``)."""
        self._input = (body, operation, {"fields": fields, "variables": variables, "field_names": field_names})
        policies = [p for p in self.policies if p.check_input]
        if not policies:
            return
        if operation == Operation.COMPLETIONS and _holds_tokens(body.get("prompt")):
            # Token ids have no text a policy can read: checked as text, the prompt would pass unread.
            raise InvalidRequestError(
                "Invalid 'prompt': this model's input is checked by a moderation policy, which reads text; send the "
                "prompt as text rather than token ids.",
                param="prompt",
                code="unsupported_value",
            )
        if variables is None:
            parts = input_parts(body, operation)
        else:
            given = [
                (f"prompt.variables.{name}", text) for name, value in variables.items() for text in _json_texts(value)
            ]
            parts = [*(part for part in given if part[1]), *input_parts({**body, "messages": []}, operation)]
        text = "\n".join(part for _, part in parts)
        if not text:
            return
        starts: list[int] = []
        at = 0
        for _, part in parts:
            starts.append(at)
            at += len(part) + 1

        def placed(hit: Hit | None) -> Hit | None:
            if hit is None or hit.at is None or not fields:
                return hit
            index = bisect_right(starts, hit.at) - 1
            field = parts[index][0]
            field = field_names.get(field, field) if field_names else field
            where = f"entry {hit.entry} at character {hit.at - starts[index]} of {field}"
            return replace(hit, where=where, field=field)

        for policy in policies:
            await self._judge(policy, "input", lambda p=policy: p.check(text), placed)

    async def check_fallback(self, model: ResolvedModel) -> Exception | None:
        """Before the first attempt on ``model``, a fallback: the refusal its own input policy gives the input
        ``check_input`` read (the model asked for and the plan's policies already passed it), or None. Each
        policy reads the input once a request: a second fallback under the same policy gets the same verdict.
        A refusal (a ``block`` hit, a failed service that fails closed, a prompt of token ids) skips the
        fallback, and the ledger row says so."""
        policy_id = model.moderation_policy_id
        if policy_id is None or self._input is None or any(p.id == policy_id for p in self.policies):
            return None
        if policy_id in self._verdicts:
            verdict = self._verdicts[policy_id]
            if verdict is not None:
                self.notes.append(f'fallback "{model.name}" skipped: refused by the same policy')
            return verdict
        own = Moderation(
            await moderation_policies((policy_id,)), caller=self.caller, request_id=self.request_id, model=self.model
        )
        body, operation, options = self._input
        verdict: Exception | None = None
        try:
            await own.check_input(body, operation, **options)
        except (ContentPolicyViolationError, ModerationUnavailableError, InvalidRequestError) as exc:
            verdict = exc
        self._verdicts[policy_id] = verdict
        if verdict is not None and not own.notes:  # a prompt of token ids: nothing was read
            own.notes.append(f"input unread: {getattr(verdict, 'code', '') or type(verdict).__name__}")
        lead = f'fallback "{model.name}" skipped' if verdict is not None else f'fallback "{model.name}"'
        self.notes.extend(f"{lead}: {note}" for note in own.notes)
        return verdict

    def output(self) -> ReplyGuard | None:
        """The guard of a reply the model asked for writes, when a policy checks output."""
        policies = [p for p in self.policies if p.check_output]
        return ReplyGuard(self, policies) if policies else None

    async def output_for(self, served: ResolvedModel, current: ReplyGuard | None = None) -> ReplyGuard | None:
        """The guard of the reply ``served`` writes (the model that answered, a fallback's too), when a policy
        checks output: that model's own and the plan's. A reply is judged by its writer's admin, not by the policy
        of a model that did not write it. The model asked for (or one under its policy) costs no lookup.
        ``current``: the guard of the reply so far, which ``served`` continues (a stream resumed on it), kept when
        its policies are the same (it reads a word across the seam whole), else closed and replaced: the resumed
        attempt's text is checked by its own writer's policies."""
        if served.moderation_policy_id == self._model_policy_id:
            policies = self.policies
        else:
            policies = await moderation_policies((served.moderation_policy_id, self._plan_policy_id))
        checking = [p for p in policies if p.check_output]
        if current is not None:
            if [p.id for p in current.policies] == [p.id for p in checking]:
                return current
            current.close()
        return ReplyGuard(self, checking) if checking else None

    async def _judge(
        self, policy: PolicySnapshot, direction: str, check: Any, placed: Callable[[Hit | None], Hit | None]
    ) -> None:
        try:
            hit = await check()
        except Exception as exc:  # whatever failed, the text went unchecked: the policy decides
            self.unavailable(policy, direction, _reason(exc))
            return
        hit = placed(hit)
        if hit is not None:
            self.found(policy, direction, hit)

    def found(self, policy: PolicySnapshot, direction: str, hit: Hit) -> None:
        # Which policy: a request may be under two (its model's and its plan's), each with an "entry 2".
        what = f'{direction}: {hit.describe()}, policy "{policy.name}"'
        if policy.blocks:
            note = f"blocked {what}"
            self.notes.append(note)
            named = f'the content policy "{policy.name}" ({", ".join(hit.categories)})'
            if direction == "input":
                message = f"Your request was refused by {named}" + (f" in `{hit.field}`." if hit.field else ".")
            else:
                message = f"The reply was stopped by {named}; the tokens generated so far are billed."
            raise ContentPolicyViolationError(message, moderation=self.summary, param=hit.field)
        if (policy.id, direction) in self._flagged:
            return
        self._flagged.add((policy.id, direction))
        self.notes.append(f"flagged {what}")
        self._audit(policy, direction, hit)

    def unavailable(self, policy: PolicySnapshot, direction: str, reason: str) -> None:
        if not policy.fail_open:
            self.notes.append(f"{direction} unchecked: moderation unavailable")
            raise ModerationUnavailableError(
                "The content moderation service is unavailable, and this request may not be served "
                "unchecked; retry shortly.",
                moderation=self.summary,
            )
        logger.warning(
            "moderation policy %r failed on the %s of %s (%s): served unchecked (the policy fails open)",
            policy.name,
            direction,
            self.request_id,
            reason,
        )
        note = f"{direction} unchecked: moderation unavailable (fail open)"
        if note not in self.notes:
            self.notes.append(note)

    def _audit(self, policy: PolicySnapshot, direction: str, hit: Hit) -> None:
        """``moderation.flag`` in the audit log, written off the request's path; a failure is logged."""
        caller = self.caller
        if caller.api_key_id is not None:
            actor = Actor(ActorType.KEY, str(caller.api_key_id), f"key {caller.api_key_id} of {caller.username}")
        else:
            actor = Actor(ActorType.USER, str(caller.user_id), caller.username)
        flagged = {"direction": direction, "categories": list(hit.categories), "policy": policy.name}
        if hit.where:
            flagged["where"] = hit.where
        record = sync_to_async(audit_record)
        task = asyncio.ensure_future(
            record(
                "moderation.flag",
                target_type="request",
                target_id=self.request_id,
                target_repr=f"{self.model} request {self.request_id}",
                changes={"flagged": [None, flagged]},
                actor=actor,
            )
        )
        _background.add(task)
        task.add_done_callback(_audit_done)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ModerationServiceError):
        return str(exc)
    logger.error("a moderation check failed unexpectedly", exc_info=exc)
    return f"unexpected {type(exc).__name__}"


def _audit_done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled() and task.exception() is not None:
        logger.error("a moderation.flag audit event could not be written", exc_info=task.exception())


async def moderation_drain() -> None:
    """Wait for the audit events still being written (tests, shutdown)."""
    while _background:
        await asyncio.gather(*list(_background), return_exceptions=True)


async def moderation_for(
    caller: Caller,
    model: ResolvedModel,
    operation: str,
    *,
    request_id: str,
    fallbacks: Iterable[ResolvedModel] = (),
) -> Moderation | None:
    """The request's moderation, or None when no policy applies (the model's, the plan's and the ``fallbacks``'
    ids are read from snapshots already cached for routing and admission). A fallback's own policy is not the
    request's: it is applied only before that fallback is tried (``Moderation.check_fallback``)."""
    if operation not in MODERATED:
        return None
    plan_policy = (await user_limits(caller.user_id)).moderation_policy_id
    guarded = any(fallback.moderation_policy_id is not None for fallback in fallbacks)
    if model.moderation_policy_id is None and plan_policy is None and not guarded:
        return None
    policies = await moderation_policies((model.moderation_policy_id, plan_policy))
    if not policies and not guarded:
        return None
    return Moderation(
        policies,
        caller=caller,
        request_id=request_id,
        model=model.name,
        model_policy_id=model.moderation_policy_id,
        plan_policy_id=plan_policy,
    )


class ReplyGuard:
    """The output check of one reply. ``feed`` each piece before it is relayed; ``finish`` at the end.

    Each choice of the reply (``n`` > 1) is checked as a text of its own: a stream interleaves their pieces,
    and read as one text, the words of one choice would run into another's and escape the block-list.

    Block-list policies scan only the text added since their last scan plus an overlap as long as their
    longest entry: a blocking one before each piece is relayed, a flagging one every ``stream_interval_chars``
    characters. When a blocking entry matches up to the very end of the text so far (the next piece decides
    whether it is a whole word), ``feed`` says the piece must be held back, and the next piece is scanned
    whatever the mark: relaying it would hand the client the very words the policy blocks (``relay`` does
    the holding). OpenAI policies are asked at the same marks in a background task, so the relay does not
    wait for them: a verdict is read at the next piece (a block cuts the stream there), each question about
    what none has read yet and the ``OPENAI_SEAM_CHARS`` before it, and ``finish`` waits for the last one and
    asks about the rest before the stream may end cleanly."""

    def __init__(self, moderation: Moderation, policies: list[PolicySnapshot]) -> None:
        self.moderation = moderation
        self.policies = policies
        self._done: set[int] = set()  # flag policies that found something: nothing more to do
        self._choices: dict[int, _ChoiceGuard] = {}
        self._calls: dict[tuple[int, int], JsonStrings] = {}  # each tool call's arguments, decoded as they come

    @property
    def holding(self) -> bool:
        """Whether the reply so far may end in a blocked entry: what is not relayed yet must wait."""
        return any(choice.holding for choice in self._choices.values())

    async def feed(self, piece: str, choice: int = 0, *, call: int | None = None) -> bool:
        """Take ``piece`` of ``choice`` (not yet relayed) into the reply; raise when the reply must stop
        before it. False: the reply so far may end in a blocked entry, so ``piece`` (and whatever follows) is
        held back until a later ``feed`` returns True or ``finish`` passes. With ``call``, ``piece`` is a part
        of that tool call's arguments (a JSON text), read decoded: the strings the tool will be given."""
        if call is not None and piece:
            decoder = self._calls.get((choice, call))
            if decoder is None:
                decoder = self._calls[(choice, call)] = JsonStrings()
            piece = decoder.feed(piece)
        if piece:
            await self._choice(choice).feed(piece)
        return not self.holding

    def _choice(self, choice: int) -> _ChoiceGuard:
        guard = self._choices.get(choice)
        if guard is None:
            guard = self._choices[choice] = _ChoiceGuard(self.moderation, self.policies, self._done)
        return guard

    async def finish(self) -> None:
        """The end of the reply: every policy has the last word on all of it."""
        for (choice, _), decoder in self._calls.items():
            if rest := decoder.flush():  # arguments cut inside an escape: what is left, as it came
                await self._choice(choice).feed(rest)
        for guard in list(self._choices.values()):
            await guard.finish()

    async def relay(
        self,
        items: AsyncIterator[T],
        pieces_of: Callable[[T], Iterable[tuple[int, str, int | None]]],
        *,
        last: Callable[[T], bool] = lambda item: False,
        arrived: Callable[[T], None] = lambda item: None,
    ) -> AsyncIterator[T]:
        """``items`` (a stream's chunks or events) as the check lets them go: the text of each (``pieces_of``:
        choice, text, and the tool call whose arguments it is a part of, or None) is fed before it is relayed;
        while the text so far may end in a blocked entry, items are held back, in order, until a later piece
        clears it or the final check does. ``finish`` runs before the ``last`` item (the event that says the
        stream ended cleanly), or at the end of ``items``. ``arrived`` sees each item as it comes (the
        upstream's usage counts what was generated, even if the reply is cut before it is relayed)."""
        held: list[T] = []
        async for item in items:
            arrived(item)
            if last(item):
                await self.finish()
            else:
                for choice, piece, call in pieces_of(item):
                    await self.feed(piece, choice, call=call)
                if self.holding:
                    held.append(item)
                    continue
            for ready in held:
                yield ready
            held.clear()
            yield item
        await self.finish()
        for ready in held:
            yield ready

    async def check(self, text: str, *, arguments: Iterable[str] = ()) -> None:
        """A whole reply (not streamed): its text, and its tool calls' ``arguments`` (JSON texts, read decoded,
        or as they are when they are not JSON)."""
        await self.feed("\n".join(part for part in (text, *map(json_decoded, arguments)) if part))
        await self.finish()

    def close(self) -> None:
        """The reply ended another way: stop asking."""
        for guard in self._choices.values():
            guard.close()


# What a JSON string's escapes stand for (``\u`` and its four hex digits apart).
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_HEX = frozenset("0123456789abcdefABCDEF")
_STRING_STOP = re.compile(r'["\\]')


class JsonStrings:
    """A JSON text (a tool call's arguments) as its reader gets it, decoded piece by piece as a stream brings
    it: each string's escapes (``\\u0066``, a surrogate pair, ``\\n``, ``\\/``) are the characters they stand
    for, and everything else is kept as it came (the quotes and structure, numbers, and text that is not JSON,
    so that a word cannot run into the next string's). The state across pieces: inside a string or not, an
    escape begun (its backslash and what of it came), a high surrogate waiting for its low half. A lone
    surrogate reads U+FFFD; an escape JSON does not know is kept as it came. Per piece: a search for the next
    quote or backslash, and a few steps per escape."""

    __slots__ = ("_escape", "_high", "_in_string")

    def __init__(self) -> None:
        self._in_string = False
        self._escape = ""  # an escape begun: its backslash and what of it came so far
        self._high = ""  # a high surrogate, until the next escape shows whether its low half follows

    def feed(self, piece: str) -> str:
        """The decoded text of ``piece``: what the pieces so far spell and the last did not."""
        out: list[str] = []
        at, end = 0, len(piece)
        while at < end:
            if self._escape:
                at = self._escaping(piece, at, out)
            elif self._high and piece[at] != "\\":
                out.append("\ufffd")
                self._high = ""
            elif not self._in_string:
                quote = piece.find('"', at)
                if quote < 0:
                    out.append(piece[at:])
                    break
                out.append(piece[at : quote + 1])
                self._in_string, at = True, quote + 1
            else:
                stop = _STRING_STOP.search(piece, at)
                if stop is None:
                    out.append(piece[at:])
                    break
                out.append(piece[at : stop.start()])
                at = stop.end()
                if stop.group() == '"':
                    out.append('"')
                    self._in_string = False
                else:
                    self._escape = "\\"
        return "".join(out)

    def flush(self) -> str:
        """The end of the text: an escape it was cut inside, as it came; a high surrogate left alone."""
        rest = ("\ufffd" if self._high else "") + self._escape
        self._high = self._escape = ""
        return rest

    def _escaping(self, piece: str, at: int, out: list[str]) -> int:
        """Go on with the escape begun at ``piece[at]``; where to go on from."""
        escape = self._escape
        if len(escape) == 1:  # the backslash alone so far
            kind = piece[at]
            if kind != "u":
                if self._high:
                    out.append("\ufffd")
                    self._high = ""
                out.append(_ESCAPED.get(kind, escape + kind))  # one JSON does not know: as it came
                self._escape = ""
                return at + 1
            self._escape, at = "\\u", at + 1
        while at < len(piece) and len(self._escape) < 6:
            if piece[at] not in _HEX:  # not an escape: as it came, and the character read on its own
                out.append(self._escape)
                self._escape = ""
                return at
            self._escape += piece[at]
            at += 1
        if len(self._escape) == 6:
            code = int(self._escape[2:], 16)
            self._escape = ""
            if 0xDC00 <= code < 0xE000 and self._high:
                out.append(chr(0x10000 + ((ord(self._high) - 0xD800) << 10) + code - 0xDC00))
                self._high = ""
            else:
                if self._high:
                    out.append("\ufffd")
                    self._high = ""
                if 0xD800 <= code < 0xDC00:
                    self._high = chr(code)
                else:
                    out.append("\ufffd" if 0xDC00 <= code < 0xE000 else chr(code))
        return at


def json_decoded(text: str) -> str:
    """A whole tool call's arguments as its reader gets them (``JsonStrings``) when they are JSON; as they are
    when they are not."""
    try:
        json.loads(text)
    except ValueError:
        return text
    except RecursionError:  # JSON nested deeper than Python's parser goes: the decoder does not recurse
        pass
    decoder = JsonStrings()
    return decoder.feed(text) + decoder.flush()


class _ChoiceGuard:
    """The output check of one choice's text (``ReplyGuard``)."""

    def __init__(self, moderation: Moderation, policies: list[PolicySnapshot], done: set[int]) -> None:
        self.moderation = moderation
        self.policies = policies
        # What a moderation service's next question reads: the reply from ``_base`` on (none under block-lists).
        self._parts: list[str] = []
        self._base = 0
        self._asks = any(not p.is_blocklist for p in policies)
        self._length = 0
        # What block-lists read: the reply's plain form, built as it comes (each piece is looked at once).
        self._plain = PlainText(whole=False) if any(p.is_blocklist for p in policies) else None
        self._scanned: dict[int, int] = {p.id: 0 for p in policies}  # block-list: plain characters scanned
        self._marked: dict[int, int] = {p.id: 0 for p in policies}  # length at the last check
        self._asked: dict[int, asyncio.Task[Hit | None]] = {}  # service: the question in flight
        self._judged: dict[int, int] = {p.id: 0 for p in policies}  # service: the reply's length it was last asked
        self._done = done  # the reply's: a flag is recorded once whichever choice it is found in
        self._holding: set[int] = set()  # blocking block-lists whose text so far may end in a hit
        self._finished = -1  # the length of the reply ``finish`` last passed

    def _text_from(self, start: int) -> str:
        """The reply from ``start`` (not before ``_base``) to its end."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        text = self._parts[0] if self._parts else ""
        return text[max(0, start - self._base) :]

    def _release_text(self) -> None:
        """Let go of the reply before what any moderation service's next question re-reads."""
        keep = min(
            (
                max(0, self._judged[p.id] - OPENAI_SEAM_CHARS)
                for p in self.policies
                if not p.is_blocklist and p.id not in self._done
            ),
            default=self._length,
        )
        if keep > self._base:
            self._parts = [self._text_from(keep)]
            self._base = keep

    @property
    def holding(self) -> bool:
        return bool(self._holding)

    async def feed(self, piece: str) -> None:
        if self._asks:
            self._parts.append(piece)
        self._length += len(piece)
        if self._plain is not None:
            self._plain.add(piece)
        for policy in self.policies:
            if policy.id in self._done:
                continue
            if not policy.is_blocklist:
                await self._collect(policy, wait=False)
            # A blocking block-list scans every piece (a scan reads only what is new, plus its overlap): between
            # two marks a blocked word would reach the client. The interval spaces the questions to a moderation
            # service, and a flagging block-list's scans.
            due = (policy.is_blocklist and policy.blocks) or (
                self._length - self._marked[policy.id] >= policy.stream_interval_chars
            )
            if due or policy.id in self._holding:
                self._marked[policy.id] = self._length
                if policy.is_blocklist:
                    self._scan(policy, final=False)
                elif policy.id not in self._asked:
                    self._ask(policy)
        if self._plain is not None:
            self._release()

    def _release(self) -> None:
        """Let go of the plain form that no block-list's scan will read again: each reads from where it stopped less
        its overlap, and a word there may reach as far back again (``PlainText.release``, as a whole input's scan).
        Kept whole, the form was joined anew after every piece, a reply's check growing with the square of its
        length."""
        keep = [
            self._scanned[policy.id] - 2 * policy.blocklist.overlap - 1
            for policy in self.policies
            if policy.is_blocklist and policy.blocklist and policy.id not in self._done
        ]
        if keep:
            self._plain.release(min(keep))  # type: ignore[union-attr]

    async def finish(self) -> None:
        if self._finished == self._length:
            return
        if self._plain is not None:
            self._plain.close()
        for policy in self.policies:
            if policy.id in self._done:
                continue
            if policy.is_blocklist:
                self._scan(policy, final=True)
                continue
            await self._collect(policy, wait=True)
            if policy.id not in self._done and self._judged[policy.id] != self._length:
                self._ask(policy)
                await self._collect(policy, wait=True)
        self._finished = self._length

    def close(self) -> None:
        for task in self._asked.values():
            if task.done() and not task.cancelled():
                task.exception()  # a verdict nobody reads any more: retrieved, so that asyncio does not log it
            task.cancel()
        self._asked.clear()

    def _scan(self, policy: PolicySnapshot, *, final: bool) -> None:
        blocklist = policy.blocklist
        if not blocklist or self._plain is None:
            return
        start = max(0, self._scanned[policy.id] - blocklist.overlap)
        hit, open_at_end = blocklist.scan_open(self._plain, start=start, final=final)
        # Up to what no later piece can change (a mark may still join the last character): the overlap re-reads
        # from there, in plain characters, however many invisible ones the reply put between a word's letters.
        self._scanned[policy.id] = self._plain.settled
        if open_at_end and policy.blocks:
            self._holding.add(policy.id)
        else:
            self._holding.discard(policy.id)
        if hit is not None:
            self._found(policy, hit)

    def _ask(self, policy: PolicySnapshot) -> None:
        """Ask the service about what no question read yet, and the ``OPENAI_SEAM_CHARS`` before it: a passage
        of up to that many characters across the seam is read whole by this question. Sent the reply so far,
        each question cost its length (a long reply the square of it); sent its last 32,000 characters, a
        passage further back that streamed while a question was out was never read."""
        start = max(0, self._judged[policy.id] - OPENAI_SEAM_CHARS)
        self._judged[policy.id] = self._length
        self._asked[policy.id] = asyncio.ensure_future(policy.ask_service(self._text_from(start)))
        self._release_text()

    async def _collect(self, policy: PolicySnapshot, *, wait: bool) -> None:
        task = self._asked.get(policy.id)
        if task is None:
            return
        if not task.done():
            if not wait:
                return
            await asyncio.wait({task})
        del self._asked[policy.id]
        try:
            hit = task.result()
        except Exception as exc:  # whatever failed, the reply went unchecked: the policy decides
            self.moderation.unavailable(policy, "output", _reason(exc))
            return
        if hit is not None:
            self._found(policy, hit)

    def _found(self, policy: PolicySnapshot, hit: Hit) -> None:
        if not policy.blocks:
            self._done.add(policy.id)
        self.moderation.found(policy, "output", hit)


def _holds_tokens(prompt: Any) -> bool:
    """Whether a text completion's ``prompt`` is (or holds) token ids rather than text."""
    return isinstance(prompt, list) and any(not isinstance(item, str) for item in prompt)


def input_parts(body: dict[str, Any], operation: str) -> list[tuple[str, str]]:
    """(field, text) for each text of the request that reaches the model: the Messages API's ``system``, every
    message's text whatever its role, and the tools' definitions. On the REST APIs the client writes the whole
    conversation: an earlier assistant turn (its text, a refusal, its tool calls' arguments, a ``tool_use``
    block's input) is the client's text as much as a user turn, and exempting it let a blocked word reach the
    model as a made-up earlier reply. (The chat socket's history is the server's own: it sends only the new
    turn here, ``completion_start``'s ``new_input``.)"""
    parts: list[tuple[str, str]] = []
    if operation == Operation.COMPLETIONS:
        # A text completion's prompt (a text, or texts) and a fill-in-the-middle request's suffix; a token prompt
        # has no text to read (``completion_start`` refuses one under a policy).
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            parts.append(("prompt", prompt))
        elif isinstance(prompt, list):
            parts.extend((f"prompt[{index}]", text) for index, text in enumerate(prompt) if isinstance(text, str))
        if isinstance(body.get("suffix"), str):
            parts.append(("suffix", body["suffix"]))
        return [(field, text) for field, text in parts if text]
    if operation == Operation.MESSAGES:
        parts.extend(("system", text) for text in _texts(body.get("system")))
    for index, message in enumerate(body.get("messages") or ()):
        if not isinstance(message, dict):
            continue
        field = f"messages[{index}]"
        if isinstance(message.get("name"), str):  # a participant's name, which the model reads with the turn
            parts.append((f"{field}.name", message["name"]))
        parts.extend((f"{field}.content", text) for text in _texts(message.get("content")))
        # An earlier turn's reasoning, sent back as reasoning models' servers take it: unsigned, the client's text.
        parts.extend(
            (f"{field}.{name}", message[name]) for name in REASONING_FIELDS if isinstance(message.get(name), str)
        )
        # Claude's thinking as the replies give it back (signed), which goes back to the model in a tool-use round.
        parts.extend((f"{field}.thinking_blocks[{number}]", text) for number, text in thinking_block_texts(message))
        calls = message.get("tool_calls")
        for number, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                where = f"{field}.tool_calls[{number}].function"
                parts.extend((where, text) for text in _call_texts(function))
        if isinstance(message.get("function_call"), dict):
            parts.extend((f"{field}.function_call", text) for text in _call_texts(message["function_call"]))
    # The definitions the model is given beside the messages: each tool's name, description and schema (its
    # descriptions, property names and enum values are read by the model as much as a message), a chat
    # completion's legacy ``functions`` and the JSON schema of its ``response_format``. Every string in them.
    for name in ("tools", "functions"):
        definitions = body.get(name)
        for index, definition in enumerate(definitions if isinstance(definitions, list) else ()):
            parts.extend((f"{name}[{index}]", text) for text in _json_texts(definition))
    if operation in (Operation.CHAT, Operation.RESPONSES) and isinstance(body.get("response_format"), dict):
        parts.extend(("response_format", text) for text in _json_texts(body["response_format"].get("json_schema")))
    return [(field, text) for field, text in parts if text]


def _call_texts(function: dict[str, Any]) -> Iterable[str]:
    """A chat completion's tool call as the model reads it: its name and its arguments (a JSON text, read
    decoded when it is JSON, so that an escape such as ``\\u0066orbidden`` is the word it spells)."""
    if isinstance(function.get("name"), str):
        yield function["name"]
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes: read as it is
            yield arguments
        else:
            yield from _json_texts(decoded)


def _json_texts(value: Any) -> Iterable[str]:
    """The strings of a JSON value, its keys among them (without recursion: a client may nest deeply)."""
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                stack.append(item)
                stack.append(key)
        elif isinstance(value, list):
            stack.extend(reversed(value))


def _texts(content: Any) -> Iterable[str]:
    """The text of a message's content: its text parts (a refusal's too), and the text the Messages API's
    blocks carry (a tool's result, a tool call's input, a server or MCP tool's call and an MCP tool's result,
    a document given as text or as text blocks, a search result, with their titles and context)."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if isinstance(part.get("text"), str):
                yield part["text"]
            elif kind == "refusal" and isinstance(part.get("refusal"), str):
                yield part["refusal"]
            elif kind == "thinking" and isinstance(part.get("thinking"), str):  # an earlier turn's, sent back
                yield part["thinking"]
            elif kind in TOOL_CALL_BLOCKS:
                if isinstance(part.get("name"), str):
                    yield part["name"]
                yield from _json_texts(part.get("input"))
            elif kind in ("tool_result", "search_result", "mcp_tool_result"):
                yield from _texts(part.get("content"))
            elif kind == "document" and isinstance(source := part.get("source"), dict):
                if source.get("type") == "text" and isinstance(source.get("data"), str):
                    yield source["data"]
                elif source.get("type") == "content":
                    yield from _texts(source.get("content"))
            if kind in ("document", "search_result"):
                yield from (part[name] for name in ("title", "context") if isinstance(part.get(name), str))
