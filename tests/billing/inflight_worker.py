"""A process that admits requests and dies before settling them (test_inflight_reservations).

Run as ``python -m tests.billing.inflight_worker '<json>'`` with DJANGO_SETTINGS_MODULE, TEST_DATABASE_URL
and (for the Redis store) REDIS_URL set. Admits ``count`` requests of ``max_tokens`` through the real
admission service, prints their request ids as JSON, and exits at once, as SIGKILL would leave them:
nothing settled, no ledger row, the heartbeat stopped. With ``"spool": path``, each request's row is first
spooled there with status ``server_shutdown`` and ``spooled_tokens`` completion tokens, as a server does
for a stream it cut while shutting down.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmhub.settings.test")
django.setup()

from django.conf import settings  # noqa: E402

from billing.pricing import cost_for  # noqa: E402
from billing.services.admission import admission_acquire  # noqa: E402
from billing.services.ledger import _spool  # noqa: E402
from billing.services.ledger_rows import UsageData  # noqa: E402
from providers.selectors import model_resolve  # noqa: E402


async def main(job: dict) -> list[str]:
    model = await model_resolve(job["model"])
    admitted = []
    for index in range(job["count"]):
        request_id = f"{job['tag']}-{index}"
        await admission_acquire(
            user_id=job["user_id"],
            api_key_id=job["key_id"],
            key_allowed_model_ids=None,
            model=model,
            body={"model": model.name, "messages": [], "max_tokens": job["max_tokens"]},
            request_id=request_id,
            prompt_tokens_upper=0,
            endpoint="rest",
        )
        admitted.append(request_id)
        if job.get("spool"):
            settings.LLMHUB_LEDGER_SPOOL = job["spool"]
            tokens = job["spooled_tokens"]
            _spool(
                UsageData(
                    request_id=request_id,
                    endpoint="rest",
                    stream=True,
                    status="server_shutdown",
                    user_id=job["user_id"],
                    api_key_id=job["key_id"],
                    model_id=model.id,
                    provider_id=model.provider.id,
                    model_name=model.name,
                    provider_name=model.provider.name,
                    completion_tokens=tokens,
                    cost=cost_for(model=model, prompt_tokens=0, completion_tokens=tokens),
                )
            )
    return admitted


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.loads(sys.argv[1])))), flush=True)
    os._exit(0)  # no atexit, no thread joined: like a process killed mid-request
