"""One of several processes admitting requests of the same key at the same time (test_concurrency).

Run as ``python -m tests.billing.admission_worker '<json>'`` with DJANGO_SETTINGS_MODULE, TEST_DATABASE_URL
and (for the Redis store) REDIS_URL set, through ``tests.pinned_clock`` when the test's clock is pinned. Each
request goes through the real services: admission, then the ledger's settle-and-record. Prints
{"admitted": n, "refused": n} as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.test")
django.setup()

from billing.exceptions import QuotaExceededError, RateLimitExceededError  # noqa: E402
from billing.pricing import cost_for  # noqa: E402
from billing.services.admission import admission_acquire  # noqa: E402
from billing.services.ledger import ledger_flush, usage_record_submit  # noqa: E402
from billing.services.ledger_rows import UsageData  # noqa: E402
from providers.selectors import model_resolve  # noqa: E402


async def main(job: dict) -> dict:
    model = await model_resolve(job["model"])
    # Both processes start together, so that their admissions really interleave. On the monotonic clock:
    # it is the same in every process of the machine, and a pinned wall clock does not stop it.
    await asyncio.sleep(max(0.0, job["start_at"] - time.monotonic()))

    async def one(index: int) -> str:
        request_id = f"{job['tag']}-{index}"
        try:
            admission = await admission_acquire(
                user_id=job["user_id"],
                api_key_id=job["key_id"],
                key_allowed_model_ids=None,
                model=model,
                body={"model": model.name, "messages": [], "max_tokens": job["max_tokens"]},
                request_id=request_id,
                prompt_tokens_upper=0,
            )
        except (QuotaExceededError, RateLimitExceededError):
            return "refused"
        await asyncio.sleep(0.05)  # "upstream"
        completion = job["max_tokens"]
        data = UsageData(
            request_id=request_id,
            endpoint="rest",
            stream=False,
            status="ok",
            user_id=job["user_id"],
            api_key_id=job["key_id"],
            model_id=model.id,
            provider_id=model.provider.id,
            model_name=model.name,
            provider_name=model.provider.name,
            completion_tokens=completion,
            cost=cost_for(model=model, prompt_tokens=0, completion_tokens=completion),
        )
        usage_record_submit(data, admission=admission)
        return "admitted"

    outcomes = await asyncio.gather(*(one(i) for i in range(job["count"])))
    await ledger_flush()
    return {"admitted": outcomes.count("admitted"), "refused": outcomes.count("refused")}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
