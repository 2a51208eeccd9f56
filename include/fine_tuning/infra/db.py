"""PostgreSQL access: one way to connect, and the schema migrations the pipeline relies on.

Migrations are plain SQL files shipped as package data (``migrations/NNN_name.sql``), applied
in order, once each, and recorded in ``schema_migrations`` so that every step, pod and test can
call :func:`migrate` on start without coordinating.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

log = logging.getLogger(__name__)

MIGRATIONS_PACKAGE = "fine_tuning.infra"
MIGRATIONS_DIR = "migrations"
_MIGRATION_NAME = re.compile(r"^(?P<version>\d{3})_(?P<name>[a-z0-9_]+)\.sql$")

# A migration whose first line is this runs outside a transaction (CREATE INDEX CONCURRENTLY).
NO_TRANSACTION_MARKER = "-- fine_tuning: no-transaction"
# Migrations edited after release, and the checksums they had: a database that applied the
# earlier text is not "changed after it was applied". 001 and 002 lost their CREATE INDEX
# statements to 003 (CONCURRENTLY); a database migrated before has those indexes already.
REVISED_CHECKSUMS: dict[str, frozenset[str]] = {
    "001": frozenset({"cd51f4ab460e7a8fc9d9d2d32913e4e69b811c27b8ce0ec0c1c36ae6c77fc8ef"}),
    "002": frozenset({"d5add73478265eb7dc321de004fca1ea91714045dc44d8286053f6426e074e64"}),
}

# Namespaced by schema so that tests (one schema each) and pipelines migrating different schemas
# of one database do not wait on each other; two migrators of the *same* schema serialize.
_LOCK_SQL = "SELECT pg_advisory_xact_lock(hashtextextended('fine_tuning.migrate:' || current_schema(), 0))"
# The no-transaction migrations' lock: another key, taken by polling. CREATE INDEX CONCURRENTLY
# waits for every open transaction to end; a second migrator that waited for the builder's lock
# inside a transaction (a blocking pg_advisory_lock is one) would deadlock with it.
_BUILD_LOCK_KEY = "hashtextextended('fine_tuning.migrate.no_transaction:' || current_schema(), 0)"
_BUILD_TRY_LOCK_SQL = f"SELECT pg_try_advisory_lock({_BUILD_LOCK_KEY})"
_BUILD_UNLOCK_SQL = f"SELECT pg_advisory_unlock({_BUILD_LOCK_KEY})"
_BUILD_LOCK_POLL_SECONDS = 0.5
_INVALID_INDEXES_SQL = """
    SELECT c.relname FROM pg_index i
    JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE NOT i.indisvalid AND n.nspname = current_schema() ORDER BY 1
"""


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

    @property
    def no_transaction(self) -> bool:
        return self.sql.lstrip().startswith(NO_TRANSACTION_MARKER)

    def statements(self) -> list[str]:
        """The file's statements, for a migration that runs them one by one (no transaction):
        ``--`` comment lines dropped, then split on ``;``."""
        code = "\n".join(line for line in self.sql.splitlines() if not line.lstrip().startswith("--"))
        return [statement.strip() for statement in code.split(";") if statement.strip()]


def connect(database_url: str, **kw: Any) -> Any:
    """A connection, used as ``with db.connect(url) as conn:``; ``kw`` goes to
    :func:`psycopg.connect` (e.g. ``autocommit=True``).

    A connect timeout and an ``application_name`` are set by default so that a stuck database
    fails the task instead of hanging it, and so the pipeline's sessions are visible in
    ``pg_stat_activity``. In a long-lived process that called :func:`use_pools` (the API
    server, the triggerer), a plain ``connect(url)`` borrows from the process's pool for that
    URL instead (returned at the end of the ``with``, committed or rolled back as a connection
    would be); a task's short process opens its own.
    """
    if _POOL_SIZES is not None and not kw:
        return _pool_for(database_url).connection()
    kw.setdefault("connect_timeout", 10)
    kw.setdefault("application_name", "fine_tuning")
    return psycopg.connect(database_url, **kw)


# (min, max) connections per pool once use_pools() was called; None: no pooling (a task).
_POOL_SIZES: tuple[int, int] | None = None
_POOLS: dict[str, Any] = {}
_POOLS_LOCK = threading.Lock()


def use_pools(min_size: int = 2, max_size: int = 10) -> None:
    """Make this process borrow its connections from a pool per database URL (the seed's 2-10
    per process). For processes that live long and serve many short requests."""
    global _POOL_SIZES  # noqa: PLW0603 - one switch per process, set once by its entry point
    if (min_size, max_size) == _POOL_SIZES:
        return
    if not 1 <= min_size <= max_size:
        raise ValueError(f"pool sizes must satisfy 1 <= min <= max, got {min_size}, {max_size}")
    _POOL_SIZES = (min_size, max_size)


# A process serves one or two databases; more URLs than this (a test run's schema per test)
# close the least recently used pool instead of keeping its connections open for good.
MAX_POOLS = 4


def stop_pooling() -> None:
    """Close every pool of this process and connect directly again (tests; a clean shutdown)."""
    global _POOL_SIZES  # noqa: PLW0603 - the switch use_pools() sets
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
        _POOL_SIZES = None
    for pool in pools:
        pool.close()


def _pool_for(database_url: str) -> Any:
    from psycopg_pool import ConnectionPool

    evicted = []
    with _POOLS_LOCK:
        pool = _POOLS.pop(database_url, None)
        if pool is not None:
            _POOLS[database_url] = pool  # most recently used last
        while pool is None and len(_POOLS) >= MAX_POOLS:
            evicted.append(_POOLS.pop(next(iter(_POOLS))))
        if pool is None:
            assert _POOL_SIZES is not None
            pool = ConnectionPool(
                database_url,
                min_size=_POOL_SIZES[0],
                max_size=_POOL_SIZES[1],
                kwargs={"connect_timeout": 10, "application_name": "fine_tuning"},
                # A borrower waits this long for a free connection, then fails (PoolTimeout).
                timeout=30,
                name="fine_tuning",
                open=True,
            )
            _POOLS[database_url] = pool
    for old in evicted:
        old.close()
    return pool


def pool_stats() -> dict[str, int] | None:
    """This process's PostgreSQL pools, summed (None when it does not pool): connections in use,
    idle in the pool, and the most it may open."""
    if _POOL_SIZES is None:
        return None
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
    stats = [pool.get_stats() for pool in pools]
    size = sum(s.get("pool_size", 0) for s in stats)
    idle = sum(s.get("pool_available", 0) for s in stats)
    return {"active": size - idle, "idle": idle, "max": _POOL_SIZES[1] * max(len(pools), 1)}


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

    Consecutive ordinary migrations run in one transaction under a transaction-level advisory
    lock: a second process migrating at the same time waits, then finds the work done and
    applies nothing, and a failing migration rolls back that whole batch, so the schema is never
    half-migrated. A ``no-transaction`` migration (``CREATE INDEX CONCURRENTLY``) runs on its
    own, statement by statement, in autocommit, under a session-level lock of its own.
    """
    applied_now: list[str] = []
    batch: list[Migration] = []
    for migration in load_migrations():
        if migration.no_transaction:
            applied_now += _apply_in_transaction(conn, batch)
            batch = []
            applied_now += _apply_outside_transaction(conn, migration)
        else:
            batch.append(migration)
    applied_now += _apply_in_transaction(conn, batch)
    if applied_now:
        log.info("applied migrations: %s", ", ".join(applied_now))
    return applied_now


def _is_recorded(migration: Migration, recorded: dict[str, str]) -> bool:
    if migration.version not in recorded:
        return False
    checksum = recorded[migration.version]
    if checksum != migration.checksum and checksum not in REVISED_CHECKSUMS.get(migration.version, ()):
        # An edited, already-applied migration is not re-run (that would be unsafe); say so,
        # since the database no longer matches the file.
        log.warning("migration %s changed after it was applied; not re-applying it", migration.name)
    return True


def _apply_in_transaction(conn: psycopg.Connection[Any], migrations: list[Migration]) -> list[str]:
    applied: list[str] = []
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
            if _is_recorded(migration, recorded):
                continue
            try:
                # No parameters: psycopg sends the file as one simple query, so it may hold
                # several statements.
                conn.execute(migration.sql.encode("utf-8"))
            except psycopg.Error as exc:
                raise MigrationError(f"migration {migration.name} failed: {exc}") from exc
            _record(conn, migration)
            applied.append(migration.name)
    return applied


def _record(conn: psycopg.Connection[Any], migration: Migration) -> None:
    conn.execute(
        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
        (migration.version, migration.name, migration.checksum),
    )


def _take_build_lock(conn: psycopg.Connection[Any], migration: Migration) -> None:
    """Wait for another process's no-transaction migration, never inside a transaction."""
    import time

    logged = False
    while not one_row(conn.execute(_BUILD_TRY_LOCK_SQL))[0]:
        if not logged:
            log.info("migration %s: another process is applying it; waiting", migration.name)
            logged = True
        time.sleep(_BUILD_LOCK_POLL_SECONDS)


def _apply_outside_transaction(conn: psycopg.Connection[Any], migration: Migration) -> list[str]:
    """One ``no-transaction`` migration: each statement in autocommit, under the session lock."""
    from psycopg.pq import TransactionStatus

    if conn.info.transaction_status != TransactionStatus.IDLE:
        raise MigrationError(
            f"migration {migration.name} must run outside a transaction (CREATE INDEX CONCURRENTLY), "
            "but the connection is inside one: call migrate() on a connection with no open transaction"
        )
    was_autocommit = conn.autocommit
    conn.autocommit = True
    try:
        _take_build_lock(conn, migration)
        try:
            recorded = dict(conn.execute("SELECT version, checksum FROM schema_migrations").fetchall())
            if _is_recorded(migration, recorded):
                return []
            for statement in migration.statements():
                try:
                    conn.execute(statement.encode("utf-8"))
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {migration.name} failed on {statement!r}: {exc}"
                    ) from exc
            invalid = [name for (name,) in conn.execute(_INVALID_INDEXES_SQL).fetchall()]
            if invalid:
                # IF NOT EXISTS would skip an index an interrupted CONCURRENTLY build left behind.
                raise MigrationError(
                    f"migration {migration.name}: index(es) {', '.join(invalid)} are INVALID (an "
                    "interrupted CREATE INDEX CONCURRENTLY leaves them so): DROP INDEX CONCURRENTLY "
                    "each, then run `python -m fine_tuning migrate` again"
                )
            _record(conn, migration)
        finally:
            conn.execute(_BUILD_UNLOCK_SQL)
    finally:
        conn.autocommit = was_autocommit
    return [migration.name]
