"""Make an API key and print it once."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from coupons.models import ApiKey


class Command(BaseCommand):
    help = (
        "Make an API key for a shop's backend, to send as `Authorization: Bearer <key>` when "
        "the service runs with API_AUTH=required. The key is printed once, alone on the last "
        "line; only its hash is stored, so it cannot be shown again."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--scope",
            required=True,
            choices=ApiKey.Scope.values,
            help="client: claim coupons and read them; admin: also create coupons, list a "
            "coupon's claims and revoke claims.",
        )
        parser.add_argument(
            "--name",
            required=True,
            help="Who holds the key, unique (up to 50 characters); revoke_api_key takes it.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        name, scope = options["name"], options["scope"]
        if not name.strip() or len(name) > 50:
            raise CommandError("--name must be 1 to 50 characters, not only spaces.")
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"An API key named {name!r} exists already; pick another name.")
        _, key = ApiKey.objects.create_key(name=name, scope=scope)
        if options["verbosity"] > 0:
            self.stderr.write(f"API key {name!r} ({scope}); store it now, it is not shown again:")
        self.stdout.write(key)
