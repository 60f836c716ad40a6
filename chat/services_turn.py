"""The chat turn: one user message and its streamed reply, from the conversation's history to the reply's
final status. Its one home, whatever carries it: the WebSocket consumer (``chat.consumers``) parses events
and turns what a turn reports into events; anything else (a test, another transport) drives a ``ChatTurn``
the same way, with its own ``report`` callback.

A turn, in order:

1. reads the conversation's system prompt and history (another user's conversation, or one the caller's
   gateway key does not reach, ``selectors.ConversationReach``, is not found: a
   ``rejected`` ledger row, as for any refused request; one with a reply streaming, from any socket or
   process, is busy: ``conversation_busy``, refused before it is a request, with no row; not one streaming for
   this turn's ``client``, on a socket that client lost, which step 3 takes over);
2. starts the run through the pipeline (``completion_start``), which resolves the model and calls back
   ``shape`` to trim the history to that model's context window (``chat.history``): a request refused
   there (unknown model, not in the plan, bad input, no budget) gets its ``rejected`` ledger row, as a
   REST one does;
3. writes the user's message and an empty reply in ``streaming`` state, checking again under the
   conversation's lock that no reply streams there (two sends at once: the loser's run is released at no
   cost, with its ``rejected`` row); a reply streaming for the same client is closed there, and its turn is told
   through the channel layer (``REPLY_CLOSED``, to the consumer recorded as streaming it, in whichever process) and
   stops as on a disconnect; a turn the message does not reach sees its reply closed at its next checkpoint or
   heartbeat;
4. relays the reply (and the model's reasoning before it, ``TurnReasoning``), saving both every
   ``CHECKPOINT_SECONDS`` (a reload, or a crash, shows them), and reports ``TurnStarted`` with the first
   chunk, once routing knows which deployment answers;
   meanwhile, from the first wait for a token to the final write, it stamps the reply's heartbeat every
   ``LLMHUB_CHAT_HEARTBEAT_INTERVAL`` seconds, which tells the other processes it is alive (a reply whose
   process died stops beating, and soon no longer holds its conversation: ``selectors.messages_abandoned``);
5. writes the reply's final status: ``complete``; ``cancelled`` when stopped (what was written is kept; a user's
   stop before the reply began, even during step 1, still goes through steps 2 and 3: the message is kept under
   an empty stopped reply, with the request's ``cancelled`` ledger row, never dropped);
   ``error`` when the upstream failed, before or during the reply, or the server's shutdown ended it (the
   partial reply is kept).

It reports exactly one ending (``TurnCompleted``, ``TurnCancelled`` or ``TurnFailed``), preceded by
``TurnStarted`` whenever the messages were written. The database is reached through ``chat.services`` and
``chat.selectors`` in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from billing.models import Endpoint, UsageStatus
from core.exceptions import DATABASE_OUTAGE_ERRORS, ApplicationError, DatabaseUnavailableError
from providers.adapters.translate_anthropic import reasoning_text
from providers.exceptions import ProviderError
from providers.types import ResolvedModel

from . import selectors, services
from .history import Turn, history_trim
from .models import MessageStatus
from .pipeline import Caller, CompletionRun, RunResult, completion_reject, completion_start, new_request_id

logger = logging.getLogger(__name__)

# A streaming reply is written to the database at most this often, not once per token.
CHECKPOINT_SECONDS = 1.0
# The channel-layer message that tells a consumer its reply was taken over (``message``: the reply's id): handled by
# ``chat.consumers.ChatConsumer.chat_reply_closed``, Channels' handler name for this type.
REPLY_CLOSED = "chat.reply_closed"
# How long a takeover waits to tell the old reply's consumer (a Redis send, a millisecond) before its own reply goes on
# without: the old turn then stops at its next checkpoint or heartbeat.
TELL_TIMEOUT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class TurnUsage:
    """A settled run's figures, as the conversation API reads them back from the ledger row."""

    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    estimated: bool

    @classmethod
    def of(cls, result: RunResult | None) -> TurnUsage | None:
        if result is None:
            return None
        return cls(result.prompt_tokens, result.completion_tokens, result.cost, result.usage_estimated)


@dataclass(frozen=True, slots=True)
class TurnStarted:
    """The messages are written and the reply is coming (or has failed before its first chunk: then
    ``deployment`` is None and ``model`` / ``provider`` are those asked for)."""

    conversation_id: int
    message_id: int
    title: str
    model: str
    provider: str
    deployment: str | None
    experiment: str | None = None  # "name:variant" when the reply is in an experiment (x-llmhub-experiment)


@dataclass(frozen=True, slots=True)
class TurnDelta:
    content: str


@dataclass(frozen=True, slots=True)
class TurnReasoning:
    """A piece of the model's reasoning, which comes before its reply (``reasoning_content`` or ``reasoning``)."""

    content: str


@dataclass(frozen=True, slots=True)
class TurnCompleted:
    message_id: int
    finish_reason: str | None
    usage: TurnUsage | None


@dataclass(frozen=True, slots=True)
class TurnCancelled:
    """Stopped: ``by_user`` (``ChatTurn.stop``), or because its owner is going away. ``message_id`` is None
    when its owner went away before anything was written; a user's stop, at any point, keeps the user's message
    (with an empty reply when it came before the reply began)."""

    message_id: int | None
    usage: TurnUsage | None
    by_user: bool
    # Stopped because its reply no longer streamed in the database: taken over by its client's new socket, its
    # conversation deleted (in another tab), closed by a sweep. The socket may still be there to be told.
    closed_elsewhere: bool = False


@dataclass(frozen=True, slots=True)
class TurnFailed:
    """Refused, or failed; ``error`` says why (its ``code``, ``param``, ``retry_after``) in words a client
    may see."""

    error: ApplicationError


TurnEvent = TurnStarted | TurnReasoning | TurnDelta | TurnCompleted | TurnCancelled | TurnFailed


class ChatTurn:
    """One turn of a conversation (``conversation_id=None``: the first of a new one), run by ``run`` in a
    task of its own, reporting to ``report``; ``stop`` ends it early from any other task."""

    def __init__(
        self,
        *,
        caller: Caller,
        conversation_id: int | None,
        model_name: str,
        content: str,
        report: Callable[[TurnEvent], Awaitable[None]],
        reasoning_effort: str | None = None,
        client: str = "",
        channel: str = "",
    ) -> None:
        self.caller = caller
        self.conversation_id = conversation_id  # set once a new conversation is written
        self.model_name = model_name
        self.content = content
        self.reasoning_effort = reasoning_effort  # the page's effort control; None: not asked to reason
        self.report = report
        # Who sends (the chat page's load, a program's own id; empty: unnamed): its send from another socket takes over
        # a reply streaming for it, one from a socket it lost (``chat.services.chat_turn_begin``).
        self.client = client
        # The channel-layer name of the consumer carrying the turn, recorded with the reply: a takeover tells it there.
        self.channel = channel
        self._task: asyncio.Task[Any] | None = None
        self._run: CompletionRun | None = None
        self._rows: services.TurnRows | None = None
        self._written: list[str] = []
        self._reasoning: list[str] = []
        # Until the upstream call starts a stop is only noted: the run, once admitted, must be streamed (or
        # abandoned) for the pipeline to settle it, so the turn stops itself at its next step.
        self._streaming = False
        self._stop_requested = False
        self._stopped_by_user = False
        self._answered = False  # a first chunk arrived: the run knows its deployment
        self._started_reported = False
        self._closed_elsewhere = False  # the reply was closed by another writer (taken over by its client's new socket)

    def stop(self, *, by_user: bool) -> None:
        """End the turn: ``by_user`` (the user asked; the run is recorded ``cancelled``), or because its owner
        is going away (``client_disconnected``). What was written is kept either way."""
        if self._stop_requested:
            return
        self._stop_requested = True
        self._stopped_by_user = by_user
        if self._run is not None and by_user:
            self._run.mark_cancelled()
        if self._streaming and self._task is not None:
            self._task.cancel()

    async def run(self) -> None:
        """The whole turn. Returns once its ending is reported, also when ``stop`` ended it; raises only
        ``CancelledError`` when its task was cancelled by someone else."""
        self._task = asyncio.current_task()
        run: CompletionRun | None = None
        try:
            try:
                run = await self._admit()
                if run is None:
                    return
                rows = await self._begin(run)
            except (ApplicationError, *DATABASE_OUTAGE_ERRORS) as failure:
                # The conversation is read and written in the database: without it, a 503-like error.
                exc = failure if isinstance(failure, ApplicationError) else DatabaseUnavailableError()
                if run is not None:
                    run.abandon(status=UsageStatus.REJECTED, error_type=exc.code or type(exc).__name__)
                await self.report(TurnFailed(exc))
                return
            except Exception:
                logger.exception("a chat turn in conversation %s failed before its reply started", self.conversation_id)
                await self.report(
                    TurnFailed(ApplicationError("The reply could not be started.", code="internal_error"))
                )
                return
            beating = asyncio.create_task(self._beat(rows.assistant_message.pk))
            try:
                await self._relay(run, rows)
            finally:
                beating.cancel()
        finally:
            if run is not None:
                # A no-op when the stream settled; otherwise (stopped before relaying) the one ledger row.
                run.abandon()

    async def _admit(self) -> CompletionRun | None:
        body: dict[str, Any] = {"model": self.model_name, "stream": True}
        if self.reasoning_effort is not None:
            body["reasoning_effort"] = self.reasoning_effort
        try:
            context = await database_sync_to_async(selectors.turn_context)(
                reach=selectors.conversation_reach(self.caller),
                conversation_id=self.conversation_id,
                client=self.client,
            )
        except selectors.ConversationBusyError:
            # Refused before it became a request (as a socket's own checks refuse): no ledger row.
            raise
        except (ApplicationError, *DATABASE_OUTAGE_ERRORS) as failure:
            # Refused before the pipeline saw it (a conversation not found, the database down): still a
            # request of this caller, with its rejected row like one the pipeline refuses.
            error = failure if isinstance(failure, ApplicationError) else DatabaseUnavailableError()
            completion_reject(
                caller=self.caller, endpoint=Endpoint.WEBSOCKET, request_id=new_request_id(), error=error, body=body
            )
            if error is failure:
                raise
            raise error from failure
        if self._stop_requested and not self._stopped_by_user:
            # Its owner went away before anything was admitted (a socket closed): no one to answer, nothing kept; the
            # page gives the message back when its socket drops before the reply began.
            await self.report(TurnCancelled(message_id=None, usage=None, by_user=False))
            return None
        # A user's stop, however early, goes on to keep the message with an empty stopped reply, as one a moment
        # later does: the run is admitted already cancelled, and the relay ends it before it sends anything.
        turns = [*context.turns, Turn("user", self.content)]

        def shape(model: ResolvedModel) -> list[dict[str, Any]]:
            if self.reasoning_effort is not None and not model.supports_reasoning:
                # The page offers the control only for models that reason; another's server would refuse it.
                raise ApplicationError(
                    f"The model `{model.name}` does not reason: send no `reasoning_effort` with it.",
                    param="reasoning_effort",
                    code="unsupported_value",
                )
            return history_trim(
                turns=turns,
                system_prompt=context.system_prompt,
                context_window=model.context_window,
                max_output_tokens=model.max_output_tokens,
            )

        # The input check reads what this turn adds: the history is the conversation's own (its user turns
        # were checked when sent, its replies as output), and read again on every turn it cost more each turn
        # and flagged each later turn again. The system prompt is the user's, set outside the socket: read too.
        new_input = [turn.as_message() for turn in (Turn("system", context.system_prompt), turns[-1]) if turn.content]
        run = await completion_start(
            caller=self.caller,
            body=body,
            endpoint=Endpoint.WEBSOCKET,
            shape=shape,
            new_input=new_input,
        )
        self._run = run
        if self._stopped_by_user:
            run.mark_cancelled()
        return run

    async def _begin(self, run: CompletionRun) -> services.TurnRows:
        rows = await database_sync_to_async(services.chat_turn_begin)(
            reach=selectors.conversation_reach(self.caller),
            conversation_id=self.conversation_id,
            model_name=run.model.name,
            provider_name=run.model.provider.name,
            content=self.content,
            request_id=run.request_id,
            client=self.client,
            stream_channel=self.channel,
        )
        self.conversation_id = rows.conversation.pk
        self._rows = rows
        await _tell_taken_over(rows.taken_over)
        return rows

    @property
    def message_id(self) -> int | None:
        """The reply's id, once written."""
        return self._rows.assistant_message.pk if self._rows is not None else None

    async def _relay(self, run: CompletionRun, rows: services.TurnRows) -> None:
        message_id = rows.assistant_message.pk
        self._streaming = True
        if self._stop_requested:
            # A stop arrived while the run was being admitted: the pipeline settles it on cancellation.
            asyncio.current_task().cancel()  # type: ignore[union-attr]
        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
        try:
            # aclosing: whatever ends this loop early, the pipeline's stream is closed and settles at once.
            async with contextlib.aclosing(run.stream()) as chunks:
                async for chunk in chunks:
                    if not self._answered:
                        self._answered = True
                        await self._report_started(run)
                    thought, piece = _delta_texts(chunk)
                    if not thought and not piece:
                        continue
                    if thought:
                        self._reasoning.append(thought)
                        await self.report(TurnReasoning(thought))
                    if piece:
                        self._written.append(piece)
                        await self.report(TurnDelta(piece))
                    if time.monotonic() >= checkpoint_at:
                        await self._checkpoint(message_id)
                        checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
        except asyncio.CancelledError:
            self._streaming = False
            shutdown = run.shutdown_error()
            if shutdown is not None:
                # The server's shutdown ended the reply: the partial message is kept, and the client told.
                await self._finish(run, message_id, MessageStatus.ERROR, error_message=shutdown.message)
                await self._report_started(run)
                await self.report(TurnFailed(shutdown))
                return
            # Closing the stream settled the run: what was delivered is billed, and the usage says so. A reply closed by
            # another writer keeps that writer's note.
            await self._finish(
                run, message_id, MessageStatus.CANCELLED, error_message=None if self._closed_elsewhere else ""
            )
            await self._report_started(run)
            await self.report(
                TurnCancelled(
                    message_id=message_id,
                    usage=TurnUsage.of(run.result),
                    by_user=self._stopped_by_user,
                    closed_elsewhere=self._closed_elsewhere,
                )
            )
            if not self._own_cancellation():
                raise
            return
        except ProviderError as exc:
            # Before the first chunk, every deployment (and fallback) failed; after it, the stream broke.
            self._streaming = False
            await self._finish(run, message_id, MessageStatus.ERROR, error_message=exc.message)
            await self._report_started(run)
            await self.report(TurnFailed(exc))
            return
        except Exception:
            self._streaming = False
            logger.exception("relaying the reply %s failed", run.request_id)
            await self._finish(run, message_id, MessageStatus.ERROR, error_message="The reply failed.")
            await self._report_started(run)
            await self.report(TurnFailed(ApplicationError("The reply failed.", code="internal_error")))
            return
        # From here a stop comes too late: the reply is whole, so it is saved and reported as complete.
        self._streaming = False
        result = run.result
        finish_reason = result.finish_reason if result else None
        await self._finish(run, message_id, MessageStatus.COMPLETE, finish_reason=finish_reason or "")
        await self._report_started(run)
        await self.report(
            TurnCompleted(
                message_id=message_id,
                finish_reason=finish_reason,
                usage=TurnUsage.of(result),
            )
        )

    def _own_cancellation(self) -> bool:
        """Whether the cancellation being handled is only ``stop``'s: then it is consumed, and the turn ends
        normally; one from anywhere else goes on."""
        task = asyncio.current_task()
        if not self._stop_requested or task is None:
            return False
        return task.uncancel() == 0

    async def _report_started(self, run: CompletionRun) -> None:
        if self._started_reported or self._rows is None:
            return
        self._started_reported = True
        rows = self._rows
        answered = run.answered_by if self._answered else run.model
        deployment = answered.deployment if self._answered else None
        await self.report(
            TurnStarted(
                conversation_id=rows.conversation.pk,
                message_id=rows.assistant_message.pk,
                title=rows.conversation.title,
                model=answered.name,
                provider=answered.provider.name,
                deployment=deployment.name if deployment is not None else None,
                experiment=run.assignment.header if run.assignment is not None else None,
            )
        )

    async def _beat(self, message_id: int) -> None:
        """Stamp the reply's heartbeat until cancelled (once the reply's final status is written): one small
        write per interval, however many chunks arrive, and also while none does."""
        while True:
            await asyncio.sleep(settings.LLMHUB_CHAT_HEARTBEAT_INTERVAL)
            try:
                streaming = await database_sync_to_async(services.message_heartbeat)(message_id=message_id)
            except DATABASE_OUTAGE_ERRORS:
                # A missed beat or two is allowed for (``selectors.HEARTBEATS_MISSED``); the next one may land.
                logger.warning("a heartbeat of the reply %s was skipped: the database is unavailable", message_id)
            else:
                if not streaming:
                    self._stop_closed_elsewhere()

    def closed_elsewhere(self) -> None:
        """Told that the reply was taken over (``REPLY_CLOSED``, from the turn that took it, in any process): stopped
        at once, not at the next checkpoint or heartbeat."""
        self._stop_closed_elsewhere()

    def _stop_closed_elsewhere(self) -> None:
        """The reply no longer streams in the database, closed by another writer: its client sent again from a new
        socket (``chat.services.messages_take_over``, in any process), its conversation was deleted, or a sweep took
        it for dead. Nobody will see the rest: stopped as on a disconnect, settled for what the upstream wrote."""
        if self._streaming and not self._stop_requested:
            self._closed_elsewhere = True
            self.stop(by_user=False)

    async def _checkpoint(self, message_id: int) -> None:
        try:
            streaming = await database_sync_to_async(services.message_content_save)(
                message_id=message_id, content="".join(self._written), reasoning="".join(self._reasoning)
            )
        except DATABASE_OUTAGE_ERRORS:
            # Only a checkpoint: the reply goes on, and the next one (or the finish) saves it.
            logger.warning("a checkpoint of the reply %s was skipped: the database is unavailable", message_id)
        else:
            if not streaming:
                self._stop_closed_elsewhere()

    async def _finish(
        self,
        run: CompletionRun,
        message_id: int,
        status: MessageStatus,
        error_message: str | None = "",
        finish_reason: str = "",
    ) -> None:
        answered = run.answered_by if self._answered else None
        # Shielded: this write is what keeps a partial reply when the task is being torn down.
        try:
            await asyncio.shield(
                database_sync_to_async(services.message_finish)(
                    message_id=message_id,
                    content="".join(self._written),
                    status=status,
                    error_message=error_message,
                    model_name=answered.name if answered is not None else None,
                    provider_name=answered.provider.name if answered is not None else None,
                    reasoning="".join(self._reasoning),
                    finish_reason=finish_reason,
                )
            )
        except DATABASE_OUTAGE_ERRORS:
            # The client has the reply; the stored message keeps its last checkpoint.
            logger.warning("the reply %s was not saved: the database is unavailable", message_id)


async def _tell_taken_over(taken_over: tuple[services.TakenOver, ...]) -> None:
    """Tell the consumer streaming each reply taken over, through the channel layer (Redis's reaches every server
    process; the in-memory one, this process's): its turn stops at once, where it would go on generating, and being
    billed, until its next checkpoint (while no text comes, its next heartbeat, 10 s). A message lost (no layer, a
    Redis outage, a consumer gone) costs only that wait."""
    layer = get_channel_layer()
    if layer is None:
        return
    for reply in taken_over:
        if not reply.stream_channel:
            continue
        try:
            async with asyncio.timeout(TELL_TIMEOUT_SECONDS):
                await layer.send(reply.stream_channel, {"type": REPLY_CLOSED, "message": reply.message_id})
        except Exception as exc:  # the heartbeat still stops it; the new reply must not fail for it
            logger.warning(
                "the turn of the reply %s taken over was not told (%s): it stops at its next checkpoint or heartbeat",
                reply.message_id,
                type(exc).__name__,
            )


def _delta_texts(chunk: dict[str, Any]) -> tuple[str, str]:
    """The model's reasoning and the reply's text in a chunk."""
    choices = chunk.get("choices") or ()
    if not choices:
        return "", ""
    delta = choices[0].get("delta") or {}
    return reasoning_text(delta), delta.get("content") or ""
