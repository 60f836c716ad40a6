"""Changes to the request path that llmhub could make, applied from outside for measurement only
(``bench/profile_request.py --what-if``), so that a gain can be measured before anyone changes the code.
"""

from __future__ import annotations

import sys


def disconnect_request_signals() -> None:
    """Django runs the sync receivers of ``request_started`` and ``request_finished`` (Django's own
    ``close_old_connections``) through ``sync_to_async`` on every request: two thread hops, which the lean
    /v1 handler (``llmhub/handlers.py``) still makes, on one long-lived thread."""
    from django.core import signals
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)


def short_switch_interval() -> None:
    """A worker thread holding the GIL (the ledger write) keeps the event loop waiting up to the switch
    interval, 5 ms by default."""
    sys.setswitchinterval(0.0005)
