"""daphne as ``make run`` serves llmhub, with the access log redacted as production's is.

daphne writes its access log itself (``daphne.access.AccessLogGenerator``), not through Python's
logging, so the filter of ``llmhub.logging`` never sees it; its CLI builds that generator by name,
and this module hands it one that drops query strings. Run as ``python -m llmhub.devserver`` with
daphne's own arguments.
"""

from __future__ import annotations

from datetime import datetime

import daphne.cli
from daphne.access import AccessLogGenerator

from llmhub.logging import without_query


class RedactedAccessLog(AccessLogGenerator):
    """daphne's NCSA-style access log, each request target without its query string."""

    def write_entry(self, host: str, date: datetime, request: str, *args, **kwargs) -> None:
        action, _, target = request.partition(" ")
        super().write_entry(host, date, f"{action} {without_query(target)}", *args, **kwargs)


def main() -> None:
    daphne.cli.AccessLogGenerator = RedactedAccessLog
    daphne.cli.CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
