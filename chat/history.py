"""What part of a conversation is sent to the model: the history trimmed to the model's context window.

The rule, in full:

1. Every message is estimated at ``text_tokens(content) + 4`` tokens: the ledger's estimate
   (``providers.tokens``: about four characters a token for English text, one a CJK character), plus a few
   tokens of per-message framing. The estimate errs high for English and is cheap; it is not the provider's
   tokenizer, so the budget keeps a margin (the reserve below).
2. The budget for the prompt is ``context_window - reserve``, where ``reserve`` is the model's
   ``max_output_tokens`` when the catalog knows it, else a quarter of the context window capped at
   ``DEFAULT_OUTPUT_RESERVE`` tokens: room left for the reply.
3. The system prompt, when there is one, is always sent and counts against the budget.
4. The newest message (the user's new turn) is always sent, even if it alone is over the budget: the
   provider then answers with a clear context-length error instead of us silently sending nothing.
5. Older messages are added newest first while they fit; the first one that does not fit ends the
   walk, so what is sent is always an unbroken run of the most recent turns, never a history with holes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from providers.tokens import text_tokens

MESSAGE_OVERHEAD_TOKENS = 4
DEFAULT_OUTPUT_RESERVE = 4096


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    content: str

    def as_message(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def estimate_tokens(content: str) -> int:
    """A turn's share of the context window: its text by billing's one estimator, plus the message's framing."""
    return text_tokens(content) + MESSAGE_OVERHEAD_TOKENS


def output_reserve(*, context_window: int, max_output_tokens: int | None) -> int:
    if max_output_tokens:
        return max_output_tokens
    return min(DEFAULT_OUTPUT_RESERVE, context_window // 4)


def history_trim(
    *,
    turns: Sequence[Turn],
    system_prompt: str = "",
    context_window: int,
    max_output_tokens: int | None = None,
) -> list[dict[str, str]]:
    """The OpenAI ``messages`` list for ``turns`` (oldest first, the new user turn last) under the rule above."""
    if not turns:
        raise ValueError("history_trim needs at least the new user turn")
    budget = context_window - output_reserve(context_window=context_window, max_output_tokens=max_output_tokens)
    system = [Turn("system", system_prompt)] if system_prompt else []
    used = sum(estimate_tokens(turn.content) for turn in system) + estimate_tokens(turns[-1].content)
    kept = [turns[-1]]
    for turn in reversed(turns[:-1]):
        cost = estimate_tokens(turn.content)
        if used + cost > budget:
            break
        used += cost
        kept.append(turn)
    return [turn.as_message() for turn in [*system, *reversed(kept)]]
