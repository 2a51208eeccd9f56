"""PostgreSQL access: one way to connect, and the schema migrations the pipeline relies on.

Migrations are plain SQL files shipped as package data (``migrations/NNN_name.sql``), applied
in order, once each, and recorded in ``schema_migrations`` so that every step, pod and test can
call :func:`migrate` on start without coordinating.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "fine_tuning.infra"
MIGRATIONS_DIR = "migrations"
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")

# Namespaced by schema so that tests (one schema each) and pipelines migrating different schemas
# of one database do not wait on each other; two migrators of the *same* schema serialize.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('fine_tuning.migrate:' || current_schema(), 0))"


class MigrationError(RuntimeError):
    """A migration file is misnamed, duplicated, or failed to apply; the message names it."""


@dataclass(frozen=True)
class Migration:
    """One SQL file of the package's ``migrations`` directory."""

    version: str
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode("utf-8")).hexdigest()


def connect(database_url: str, **kw: Any) -> psycopg.Connection[Any]:
    """Open a connection; ``kw`` goes to :func:`psycopg.connect` (e.g. ``autocommit=True``).

    A connect timeout and an ``application_name`` are set by default so that a stuck database
    fails the task instead of hanging it, and so the pipeline's sessions are visible in
    ``pg_stat_activity``.
    """
    kw.setdefault("connect_timeout", 10)
    kw.setdefault("application_name", "fine_tuning")
    return psycopg.connect(database_url, **kw)


def one_row(cursor: psycopg.Cursor[Any]) -> Any:
    """The row of a query that always returns exactly one (an aggregate without GROUP BY)."""
    row = cursor.fetchone()
    if row is None:
        raise RuntimeError("a query that returns one row (an aggregate) returned none")
    return row


def load_migrations() -> list[Migration]:
    """The package's migrations in version order; misnamed or duplicate versions are errors."""
    folder = resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_DIR)
    found: dict[str, Migration] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"migration file {entry.name!r} is not named NNN_lowercase_name.sql")
        version = match["version"]
        if version in found:
            raise MigrationError(
                f"migration version {version} is used twice: {found[version].name!r} and {entry.name!r}"
            )
        found[version] = Migration(version=version, name=entry.name, sql=entry.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


def migrate(conn: psycopg.Connection[Any]) -> list[str]:
    """Apply the migrations not yet recorded in ``schema_migrations``; return the applied names.

    Everything runs in one transaction under a transaction-level advisory lock: a second process
    migrating at the same time waits, then finds the work done and applies nothing. A failing
    migration rolls back all of this call's migrations, so the schema is never half-migrated.
    """
    applied_now: list[str] = []
    migrations = load_migrations()
    with conn.transaction():
        conn.execute(_LOCK_SQL)
        conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version text PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        recorded = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
        for migration in migrations:
            if migration.version in recorded:
                # An edited, already-applied migration is not re-run (that would be unsafe); say so,
                # since the database no longer matches the file.
                if recorded[migration.version] != migration.checksum:
                    log.warning(
                        "migration %s changed after it was applied; not re-applying it", migration.name
                    )
                continue
            try:
                # No parameters: psycopg sends the file as one simple query, so it may hold
                # several statements.
                conn.execute(migration.sql.encode("utf-8"))
            except psycopg.Error as exc:
                raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
            conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.name)
    if applied_now:
        log.info("applied migrations: %s", ", ".join(applied_now))
    return applied_now
