"""The in-flight heartbeat thread survives what goes wrong in one beat (billing/services/inflight.py)."""

from __future__ import annotations

import logging

from django.conf import settings as django_settings

from billing.services import inflight


class SettingsGone:
    """The settings as another thread's ``override_settings`` can leave them for an instant (Django's
    ``LazySettings`` clears its ``__dict__`` before it sets the new settings): every read fails."""

    def __getattr__(self, name: str):
        raise AttributeError(f"'NoneType' object has no attribute {name!r}")


def test_a_failed_read_of_the_settings_does_not_end_the_heartbeat(monkeypatch, caplog):
    beat = inflight._Beat()  # not started: its steps are run here, one by one
    monkeypatch.setattr(beat, "tick", lambda: None)
    with monkeypatch.context() as gone, caplog.at_level(logging.WARNING, logger=inflight.logger.name):
        gone.setattr(inflight, "settings", SettingsGone())
        assert beat.step() == django_settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL  # the last interval known
    assert "in-flight heartbeat failed (AttributeError" in caplog.text
    assert beat.step() == django_settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL


def test_a_failing_beat_is_logged_once_a_minute_and_the_next_beat_comes(monkeypatch, caplog):
    beat = inflight._Beat()

    def tick() -> None:
        raise ConnectionError("redis down")

    monkeypatch.setattr(beat, "tick", tick)
    with caplog.at_level(logging.WARNING, logger=inflight.logger.name):
        intervals = [beat.step() for _ in range(3)]
    assert intervals == [django_settings.LLMHUB_INFLIGHT_HEARTBEAT_INTERVAL] * 3
    assert caplog.text.count("in-flight heartbeat failed (ConnectionError: redis down)") == 1
