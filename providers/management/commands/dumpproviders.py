"""``manage.py dumpproviders [-o FILE]``: write providers and models (with their deployments) as YAML,
without secrets."""

from __future__ import annotations

from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from providers.services.catalog_file import providers_dump


class Command(BaseCommand):
    help = (
        "Write every provider and catalog model (with its deployments) in the loadproviders format. Stored keys "
        "are written as ${NAME_API_KEY} references, never as values."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("-o", "--output", help="write to this file instead of standard output")

    def handle(self, *args: Any, output: str | None, **options: Any) -> None:
        text = yaml.safe_dump(providers_dump(), sort_keys=False, allow_unicode=True)
        if output is None:
            self.stdout.write(text, ending="")
            return
        try:
            with open(output, "w", encoding="utf-8") as handle:
                handle.write(text)
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc.strerror}") from None
        self.stderr.write(f"wrote {output}")
