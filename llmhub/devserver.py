"""daphne as ``make run`` serves llmhub, with the access log redacted as production's is.

daphne writes its access log itself (``daphne.access.AccessLogGenerator``), not through Python's
logging, so the filter of ``llmhub.logging`` never sees it; its CLI builds that generator by name,
and this module hands it one that drops query strings. Run as ``python -m llmhub.devserver`` with
daphne's own arguments; it takes WebSocket messages as large as production does (``arguments``).
"""

from __future__ import annotations

import sys
from datetime import datetime

import daphne.cli
from daphne.access import AccessLogGenerator

from llmhub.logging import without_query


class RedactedAccessLog(AccessLogGenerator):
    """daphne's NCSA-style access log, each request target without its query string."""

    def write_entry(self, host: str, date: datetime, request: str, *args, **kwargs) -> None:
        action, _, target = request.partition(" ")
        super().write_entry(host, date, f"{action} {without_query(target)}", *args, **kwargs)


# The Dockerfile's --ws-max-size: the largest chat frame a client may send is about 1.2 MB (docs/deployment.md), and
# daphne's own limit (1 MiB a message and a frame) refused it.
WEBSOCKET_MAX_BYTES = 1_310_720


def arguments(argv: list[str]) -> list[str]:
    """daphne's arguments: production's WebSocket size limit, then ``argv`` (which wins where it says otherwise)."""
    limit = str(WEBSOCKET_MAX_BYTES)
    return ["--websocket-max-message-size", limit, "--websocket-max-frame-size", limit, *argv]


def main() -> None:
    daphne.cli.AccessLogGenerator = RedactedAccessLog
    daphne.cli.CommandLineInterface().run(arguments(sys.argv[1:]))


if __name__ == "__main__":
    main()
