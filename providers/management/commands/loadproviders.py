"""``manage.py loadproviders FILE.yaml``: create or update providers, models and their deployments from a
YAML file."""

from __future__ import annotations

import os
from typing import Any

import yaml
from django.core.management.base import BaseCommand, CommandError, CommandParser

from core.exceptions import ApplicationError
from providers.services.catalog_file import catalog_yaml_parse, providers_load


class Command(BaseCommand):
    help = (
        "Create or update providers, catalog models and their deployments from a YAML file (the dumpproviders "
        "format). ${VAR} references are read from the environment. Idempotent; all or nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("file", help="path of the YAML file")

    def handle(self, *args: Any, file: str, **options: Any) -> None:
        try:
            with open(file, encoding="utf-8") as handle:
                data = catalog_yaml_parse(handle.read())
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise CommandError(f"{file} is not valid YAML: {exc}") from None
        try:
            result = providers_load(data=data, env=os.environ)
        except ApplicationError as exc:
            raise CommandError(f"{exc.message} Nothing was written.") from None
        for warning in result.warnings:
            self.stderr.write(self.style.WARNING(f"warning: {warning}"))
        for row in result.rows:
            self.stdout.write(str(row))
        removed = result.count("removed")
        self.stdout.write(
            self.style.SUCCESS(
                f"{result.count('created')} created, {result.count('updated')} updated, "
                f"{result.count('unchanged')} unchanged" + (f", {removed} removed." if removed else ".")
            )
        )
