"""Create coupons from arguments or a JSON/CSV file; safe to re-run."""

import csv
import io
import json
from argparse import ArgumentParser
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from coupons import services
from coupons.errors import CouponExists
from coupons.serializers import CouponCreateSerializer


def read_coupon_file(path: Path) -> list[dict[str, Any]]:
    """Read coupons from a JSON list of {"name", "amount"} or a CSV with those columns."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise CommandError(f"Cannot read {path}: {error}") from error
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text, newline=""))
        return [{**row, "amount": _csv_integer(row.get("amount"))} for row in rows]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise CommandError(f'{path} must hold a JSON list of {{"name": ..., "amount": ...}}.')
    return entries


def _csv_integer(cell: str | None) -> int | str | None:
    # CSV has no types: a cell of digits is the integer it spells; anything else stays
    # text and is refused by the same validation as the API.
    return int(cell) if cell and cell.strip().isdigit() else cell


def parse_coupon_argument(argument: str) -> dict[str, Any]:
    """Parse NAME:AMOUNT; the name may itself contain ':' (the last one splits)."""
    name, separator, amount = argument.rpartition(":")
    if not separator or not amount.isdigit():
        raise CommandError(f"{argument!r} is not NAME:AMOUNT (for example PROMO_SUPER:100).")
    return {"name": name, "amount": int(amount)}


class Command(BaseCommand):
    help = (
        "Create coupons given as NAME:AMOUNT arguments or in a JSON/CSV file. "
        "Coupons that already exist are left unchanged and reported as skipped."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("coupons", nargs="*", metavar="NAME:AMOUNT")
        parser.add_argument(
            "--file",
            type=Path,
            help='A .json file (a list of {"name": ..., "amount": ...}) or a .csv file '
            "with a header row name,amount.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        entries = [parse_coupon_argument(argument) for argument in options["coupons"]]
        if options["file"]:
            entries += read_coupon_file(options["file"])
        if not entries:
            raise CommandError("Give coupons as NAME:AMOUNT arguments or with --file.")

        # Validate everything before writing anything: a typo on line 90 creates nothing.
        valid = []
        for position, entry in enumerate(entries, start=1):
            serializer = CouponCreateSerializer(data=entry)
            if not serializer.is_valid():
                raise CommandError(
                    f"Coupon #{position} ({entry!r}) is invalid: {dict(serializer.errors)}"
                )
            valid.append(serializer.validated_data)

        created = skipped = 0
        for coupon in valid:
            try:
                services.create_coupon(**coupon)
            except CouponExists:
                skipped += 1
                self.stdout.write(f"skipped {coupon['name']} (already exists)")
            else:
                created += 1
                self.stdout.write(f"created {coupon['name']} (amount {coupon['amount']})")
        self.stdout.write(self.style.SUCCESS(f"{created} created, {skipped} skipped."))
