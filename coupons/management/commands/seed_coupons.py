"""Create coupons from arguments or a JSON/CSV file; safe to re-run."""

import csv
import io
import json
import sys
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import IntegrityError, transaction
from tqdm import tqdm

from coupons import services
from coupons.models import Coupon
from coupons.serializers import CouponSerializer

# Coupons inserted per statement: each batch is one bulk insert, all in one transaction.
BATCH = 1_000


@dataclass
class Entry:
    """A coupon to create, with where it was given, for the messages."""

    where: str
    fields: Any


def read_coupon_file(path: Path) -> list[Entry]:
    """Read coupons from a JSON list of {"name", "amount"[, "stock_shards", "starts_at",
    "ends_at"]} or a CSV with those columns."""
    try:
        # utf-8-sig: spreadsheets save CSV with a byte-order mark, which is not a character
        # of the first column's name.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise CommandError(f"Cannot read {path}: {error}") from error
    if path.suffix.lower() == ".csv":
        rows = csv.DictReader(io.StringIO(text, newline=""), restkey="cells beyond the header")
        # line_num counts the file's lines read so far, so a quoted cell may span several.
        return [Entry(f"{path.name} line {rows.line_num}", _csv_fields(row)) for row in rows]
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as error:
        raise CommandError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(entries, list):
        raise CommandError(f'{path} must hold a JSON list of {{"name": ..., "amount": ...}}.')
    return [Entry(f"{path.name} item {number}", fields) for number, fields in enumerate(entries, 1)]


def _csv_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A CSV row as the API's JSON would give it. CSV has no types: a cell of digits in a
    number's column is the number it spells (anything else stays text, refused by the same
    validation as the API), and an empty cell of an optional column means its default."""
    fields = {key: cell for key, cell in row.items() if not (key in OPTIONAL and cell == "")}
    for key in NUMBERS:
        cell = fields.get(key)
        if isinstance(cell, str) and _is_decimal_number(cell.strip()):
            fields[key] = int(cell)
    return fields


WINDOW = ("starts_at", "ends_at")
OPTIONAL = (*WINDOW, "stock_shards")
NUMBERS = ("amount", "stock_shards")


def _is_decimal_number(text: str) -> bool:
    # str.isdigit() alone also takes "²" and other digits int() refuses.
    return text.isascii() and text.isdigit()


def parse_coupon_argument(argument: str) -> dict[str, Any]:
    """Parse NAME:AMOUNT; the name may itself contain ':' (the last one splits)."""
    name, separator, amount = argument.rpartition(":")
    if not separator or not _is_decimal_number(amount):
        raise CommandError(f"{argument!r} is not NAME:AMOUNT (for example PROMO_SUPER:100).")
    return {"name": name, "amount": int(amount)}


def describe_errors(errors: dict[str, Any]) -> str:
    """Say what is wrong with an entry as the API would, in one line."""
    return "; ".join(
        f"{field}: {' '.join(str(message) for message in messages)}"
        for field, messages in errors.items()
    )


class Command(BaseCommand):
    quiet = False
    help = (
        "Create coupons given as NAME:AMOUNT arguments or in a JSON or CSV file, under the "
        "same rules as the API. Everything is checked before anything is created: one "
        "invalid coupon creates none. They are created with bulk inserts in one "
        "transaction, with a progress bar on a terminal. Coupons that already exist are "
        "left unchanged and reported as skipped, so the command is safe to re-run. "
        "-v 0 prints nothing, -v 2 every coupon."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parser.formatter_class = RawDescriptionHelpFormatter
        parser.epilog = (
            "examples:\n"
            "  manage.py seed_coupons PROMO_SUPER:100 'TIME:10:30:5'\n"
            "  manage.py seed_coupons BLACK_FRIDAY:500 --starts-at 2030-11-29T09:00:00Z\n"
            "  manage.py seed_coupons HOT_DEAL:5000 --stock-shards 16\n"
            "  manage.py seed_coupons --file coupons.csv   # name,amount[,starts_at,ends_at,...]\n"
            '  manage.py seed_coupons --file coupons.json  # [{"name": "A", "amount": 5}]'
        )
        return parser

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "coupons",
            nargs="*",
            metavar="NAME:AMOUNT",
            help="A coupon to create; the last ':' separates the name from the amount.",
        )
        parser.add_argument(
            "--file",
            type=Path,
            help='A .json file (a list of {"name": ..., "amount": ...}) or a .csv file '
            "with a header row name,amount (UTF-8, with or without a byte-order mark); "
            "optional starts_at and ends_at fields or columns give each coupon's sale window, "
            "and stock_shards its stock shards.",
        )
        parser.add_argument(
            "--stock-shards",
            type=int,
            metavar="K",
            help="Split the stock of the NAME:AMOUNT coupons over K rows, 1 to 64, so that "
            "up to K claims take a unit at once (docs/scaling.md). Default: 1.",
        )
        parser.add_argument(
            "--starts-at",
            metavar="TIME",
            help="When claims of the NAME:AMOUNT coupons open: ISO 8601 with a time zone, "
            "e.g. 2030-11-27T09:00:00+01:00. Default: at once.",
        )
        parser.add_argument(
            "--ends-at",
            metavar="TIME",
            help="When their claims close, likewise. Default: never.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        verbosity: int = options["verbosity"]
        entries, problems = [], []
        window = {key: options[key] for key in OPTIONAL if options[key] is not None}
        if window and options["file"]:
            raise CommandError(
                "--starts-at, --ends-at and --stock-shards apply to NAME:AMOUNT arguments; "
                "give the coupons of a file theirs in its starts_at, ends_at and "
                "stock_shards columns or fields."
            )
        for number, argument in enumerate(options["coupons"], start=1):
            try:
                coupon = parse_coupon_argument(argument)
            except CommandError as malformed:
                problems.append(f"argument {number}: {malformed}")
            else:
                entries.append(Entry(f"argument {number}", {**coupon, **window}))
        if options["file"]:
            from_file = read_coupon_file(options["file"])
            if not from_file:
                raise CommandError(f"{options['file']} holds no coupons.")
            entries += from_file
        if not entries and not problems:
            raise CommandError("Give coupons as NAME:AMOUNT arguments or with --file.")

        self.quiet = verbosity == 0
        with self.progress(len(entries), "checking") as bar:
            coupons = self.validated(entries, problems, bar.update)
        created, skipped = [], []
        try:
            with transaction.atomic(), self.progress(len(coupons), "creating") as bar:
                for start in range(0, len(coupons), BATCH):
                    batch = coupons[start : start + BATCH]
                    made, taken = services.create_coupons(batch)
                    created += made
                    skipped += taken
                    bar.update(len(batch))
        except IntegrityError:
            names = [coupon["name"] for coupon in coupons]
            if not Coupon.objects.filter(name__in=names).exists():
                raise
            raise CommandError(
                "Another process created some of these coupons meanwhile; nothing was created. "
                "Run the command again: it skips the coupons that exist."
            ) from None
        if verbosity >= 2:
            amounts = {coupon["name"]: coupon["amount"] for coupon in coupons}
            for name in created:
                self.stdout.write(f"created {name} (amount {amounts[name]})")
            for name in skipped:
                self.stdout.write(f"skipped {name} (already exists)")
        if verbosity >= 1:
            summary = f"{len(created)} created, {len(skipped)} skipped (already exist)."
            if skipped and verbosity < 2:
                shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
                summary += f" Skipped: {shown}"
            self.stdout.write(self.style.SUCCESS(summary))

    def progress(self, total: int, doing: str) -> Any:
        """A progress bar on a terminal's stderr; nothing when stderr is not a terminal."""
        shown = sys.stderr.isatty() and not self.quiet
        return tqdm(total=total, desc=doing, unit="coupon", disable=not shown)

    def validated(
        self, entries: list[Entry], problems: list[str], advance: Callable[[int], Any]
    ) -> list[dict[str, Any]]:
        """Check every entry as the API would, and that no name comes twice; raise with every
        problem found (and those already found), so that one run shows them all."""
        coupons = []
        first_given: dict[str, str] = {}
        for entry in entries:
            advance(1)
            serializer = CouponSerializer(data=entry.fields)
            if not serializer.is_valid():
                problems.append(f"{entry.where}: {describe_errors(serializer.errors)}")
                continue
            name = serializer.validated_data["name"]
            if name in first_given:
                problems.append(f"{entry.where}: {name!r} is already given at {first_given[name]}")
                continue
            first_given[name] = entry.where
            coupons.append(serializer.validated_data)
        if problems:
            listing = "\n".join(f"  {problem}" for problem in problems)
            raise CommandError(f"Nothing was created; fix these first:\n{listing}")
        return coupons
