from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "llmhub core"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from .db_use import db_use_watch
        from .sqlite_locks import sqlite_cursors_watch

        # Which threads and requests use the database (core/db_use.py), for the lean /v1 handler's end.
        connection_created.connect(db_use_watch, dispatch_uid="llmhub.core.db_use")
        # SQLite: a failed statement's cursor is closed on its own thread (core/sqlite_locks.py).
        connection_created.connect(sqlite_cursors_watch, dispatch_uid="llmhub.core.sqlite_locks")
