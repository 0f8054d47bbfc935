"""Revoke an API key by its name."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from coupons.models import ApiKey


class Command(BaseCommand):
    help = (
        "Revoke the API key of this name: every worker refuses it from its next request on "
        "(401). A revoked key cannot be restored; make a new one with create_api_key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The key's name, as create_api_key was given it.")

    def handle(self, *args: Any, **options: Any) -> None:
        name = options["name"]
        if not ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"No API key is named {name!r}.")
        if not ApiKey.objects.filter(name=name, revoked=False).update(revoked=True):
            raise CommandError(f"The API key {name!r} was revoked already.")
        if options["verbosity"] > 0:
            self.stdout.write(f"Revoked the API key {name!r}.")
