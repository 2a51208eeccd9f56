"""Migrations on the agent's live posts table: indexes built CONCURRENTLY, outside a transaction."""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest

from fine_tuning.infra import db

INDEXES = {"posts_ts_idx", "posts_model_ts_idx"}
NOW = datetime(2026, 11, 1, tzinfo=UTC)


def _index_migration_undone(conn: psycopg.Connection) -> None:
    """The schema as a database that has not yet applied 003: the table, no indexes on it."""
    for name in INDEXES:
        conn.execute(f"DROP INDEX IF EXISTS {name}")
    conn.execute("DELETE FROM schema_migrations WHERE version = '003'")


def _valid_indexes(conn: psycopg.Connection) -> set[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE i.indisvalid AND n.nspname = current_schema() AND i.indrelid = 'posts'::regclass"
    ).fetchall()
    return {name for (name,) in rows}


def test_the_posts_indexes_are_built_without_blocking_the_agents_inserts(pg_url: str) -> None:
    """While 003 builds the indexes (it waits here for a transaction of the agent's to end), the
    agent can still insert: CONCURRENTLY takes SHARE UPDATE EXCLUSIVE, not the SHARE lock that
    a plain CREATE INDEX would hold for the whole build."""
    with db.connect(pg_url, autocommit=True) as admin:
        db.migrate(admin)
        _index_migration_undone(admin)
    agent = db.connect(pg_url)  # an open transaction of the agent's, holding ROW EXCLUSIVE on posts
    agent.execute("INSERT INTO posts (persona_id, ts) VALUES ('p1', %s)", (NOW,))
    outcome: list[object] = []

    def migrate() -> None:
        try:
            with db.connect(pg_url) as conn:
                outcome.append(db.migrate(conn))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)

    migrator = threading.Thread(target=migrate)
    migrator.start()
    try:
        with db.connect(pg_url, autocommit=True) as observer:
            deadline = time.monotonic() + 60
            modes: set[str] = set()
            while "ShareUpdateExclusiveLock" not in modes and time.monotonic() < deadline:
                modes = {
                    mode
                    for (mode,) in observer.execute(
                        "SELECT mode FROM pg_locks WHERE relation = 'posts'::regclass AND granted "
                        "AND pid <> pg_backend_pid() AND pid <> %s",
                        (agent.info.backend_pid,),
                    ).fetchall()
                }
                time.sleep(0.05)
            assert "ShareUpdateExclusiveLock" in modes and "ShareLock" not in modes, modes
            # A second writer goes through while the build waits: no lock timeout fires.
            observer.execute("SET lock_timeout = '5s'")
            observer.execute("INSERT INTO posts (persona_id, ts) VALUES ('p2', %s)", (NOW,))
    finally:
        agent.commit()
        agent.close()
        migrator.join(timeout=120)
    assert outcome == [["003_posts_indexes.sql"]], outcome
    with db.connect(pg_url, autocommit=True) as conn:
        assert _valid_indexes(conn) >= INDEXES


def test_an_interrupted_concurrent_build_is_refused_not_recorded(pg_url: str) -> None:
    """An INVALID index (left by a failed CONCURRENTLY build) would satisfy IF NOT EXISTS: the
    migration refuses, names it and says what to do, and is not recorded as applied."""
    with db.connect(pg_url, autocommit=True) as conn:
        db.migrate(conn)
        _index_migration_undone(conn)
        conn.execute("INSERT INTO posts (persona_id, ts) VALUES ('p1', %s), ('p2', %s)", (NOW, NOW))
        with pytest.raises(psycopg.errors.UniqueViolation):  # fails, leaving posts_ts_idx INVALID
            conn.execute("CREATE UNIQUE INDEX CONCURRENTLY posts_ts_idx ON posts (ts)")
        with pytest.raises(db.MigrationError, match=r"posts_ts_idx are INVALID .* DROP INDEX CONCURRENTLY"):
            db.migrate(conn)
        assert conn.execute("SELECT count(*) FROM schema_migrations WHERE version = '003'").fetchone() == (0,)
        conn.execute("DROP INDEX CONCURRENTLY posts_ts_idx")
        assert db.migrate(conn) == ["003_posts_indexes.sql"]
        assert _valid_indexes(conn) >= INDEXES


def test_a_migration_outside_a_transaction_refuses_an_open_one(pg_url: str) -> None:
    with db.connect(pg_url, autocommit=True) as conn:
        db.migrate(conn)
        _index_migration_undone(conn)
    with db.connect(pg_url) as conn:
        conn.execute("SELECT 1")  # opens a transaction (not autocommit)
        with pytest.raises(db.MigrationError, match="003_posts_indexes.sql must run outside a transaction"):
            db.migrate(conn)


def test_a_database_migrated_before_the_index_move_is_not_told_its_migrations_changed(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with db.connect(pg_url, autocommit=True) as conn:
        db.migrate(conn)
        for version, (checksum,) in db.REVISED_CHECKSUMS.items():
            conn.execute("UPDATE schema_migrations SET checksum = %s WHERE version = %s", (checksum, version))
        with caplog.at_level(logging.WARNING, logger="fine_tuning.infra.db"):
            assert db.migrate(conn) == []
        assert not [r for r in caplog.records if "changed after it was applied" in r.getMessage()]
        conn.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = '002'")
        with caplog.at_level(logging.WARNING, logger="fine_tuning.infra.db"):
            db.migrate(conn)
        assert [r for r in caplog.records if "002_ab_tests_and_deployments.sql changed" in r.getMessage()]
