"""Create the PostgreSQL database the settings name, if it does not exist yet."""

from typing import Any

import psycopg
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from psycopg import sql


class Command(BaseCommand):
    help = (
        "Create the PostgreSQL database that DATABASE_URL names, if it does not exist yet, "
        "so that `migrate` can fill it. Safe to re-run. With SQLite there is nothing to do: "
        "the file is created when first used."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--database", default=DEFAULT_DB_ALIAS, help="The database alias in the settings."
        )

    def handle(self, *args: Any, **options: Any) -> None:
        connection = connections[options["database"]]
        if connection.vendor != "postgresql":
            return
        parameters = connection.get_connection_params()
        name = parameters["dbname"]
        server = f"{parameters.get('host') or 'localhost'}:{parameters.get('port') or 5432}"
        try:
            psycopg.connect(**parameters).close()
            return
        except psycopg.Error as error:
            unreachable = f"Cannot reach the database {name!r} on {server}: {first_line(error)}"
        # Whether it is missing, asked of the server's own maintenance database.
        try:
            admin = psycopg.connect(**{**parameters, "dbname": "postgres"}, autocommit=True)
        except psycopg.Error:
            raise CommandError(unreachable) from None
        with admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                raise CommandError(unreachable)
            try:
                admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            except psycopg.Error as error:
                raise CommandError(
                    f"Cannot create the database {name!r} on {server} ({first_line(error)});"
                    f" create it yourself (createdb -h HOST -U USER {name}) or fix DATABASE_URL."
                ) from None
        if options["verbosity"] >= 1:
            self.stdout.write(f"Created the database {name!r} on {server}.")


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]
