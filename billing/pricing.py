"""The one place a request's cost is computed: tokens × the catalog's prices per million tokens."""

from __future__ import annotations

from decimal import Context, Decimal, localcontext

from providers.types import ResolvedModel

MILLION = Decimal(1_000_000)
# The ledger keeps 10 decimal places: a millionth of a cent is far below any price step.
COST_QUANTUM = Decimal("0.0000000001")
# Wide enough that no token count a request can carry makes the quantized cost overflow the precision
# (the default 28 digits leave 18 above the 10 decimal places: quantize would raise InvalidOperation).
_COST_CONTEXT = Context(prec=80)


def cost_for(*, model: ResolvedModel, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> Decimal:
    """Cached prompt tokens are part of ``prompt_tokens`` (OpenAI's convention) and priced at the cached
    rate when the catalog has one."""
    cached = min(max(cached_tokens, 0), prompt_tokens)
    cached_price = model.input_per_mtok if model.cached_input_per_mtok is None else model.cached_input_per_mtok
    with localcontext(_COST_CONTEXT):
        total = (
            Decimal(prompt_tokens - cached) * model.input_per_mtok
            + Decimal(cached) * cached_price
            + Decimal(completion_tokens) * model.output_per_mtok
        ) / MILLION
        return total.quantize(COST_QUANTUM)
