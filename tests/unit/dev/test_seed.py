"""Synthetic posts: the right number, realistic spread, every kind of bad row, deterministic."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from fine_tuning.infra import db
from fine_tuning.collect import tokens
from fine_tuning.dev.seed import BAD_KINDS, HUGE_BODY_WORDS, seed_posts

END = datetime(2026, 11, 1, tzinfo=UTC)
# A digest of every column but the id, in insertion order.
ROWS_DIGEST_SQL = """
    SELECT md5(string_agg(
        concat_ws('|', persona_id, hook, body, engagement_rate::text, ts::text, tokens_used::text,
                  model_id, response_time_ms::text, quality_score::text, cost_usd::text),
        E'\\n' ORDER BY id))
    FROM posts
"""


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(pg_url, autocommit=True) as connection:
        db.migrate(connection)
        yield connection


def scalar(conn: psycopg.Connection[Any], sql: str, *params: Any) -> Any:
    row = conn.execute(sql, params).fetchone()
    assert row is not None
    return row[0]


def test_seeds_n_rows_with_every_bad_kind(conn: psycopg.Connection[Any]) -> None:
    arms = ["gpt-3.5-turbo-0125", "ft:gpt-3.5-turbo-0125:acme::x"]
    assert seed_posts(conn, 3_000, end=END, model_ids=arms) == 3_000
    assert scalar(conn, "SELECT count(*) FROM posts") == 3_000

    # 3% of 3,000 = 90 bad rows, each of the 11 kinds planted 8 or 9 times.
    per_kind = 90 // len(BAD_KINDS)
    assert scalar(conn, "SELECT count(*) FROM posts WHERE engagement_rate IS NULL") >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE engagement_rate = 'NaN'") >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE engagement_rate = 1.7") >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE engagement_rate = -0.2") >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE hook = ''") >= per_kind
    blank = "SELECT count(*) FROM posts WHERE {0} <> '' AND btrim({0}, E' \\t\\n') = ''"
    assert scalar(conn, blank.format("hook")) >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE body = ''") >= per_kind
    assert scalar(conn, blank.format("body")) >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE strpos(hook, U&'\\FFFD') > 0") >= per_kind
    assert scalar(conn, "SELECT count(*) FROM posts WHERE length(body) > 100000") >= per_kind
    duplicated = scalar(
        conn, "SELECT count(*) FROM (SELECT 1 FROM posts GROUP BY hook, body HAVING count(*) > 1) AS d"
    )
    assert duplicated >= per_kind - 1

    # A huge body really is over 20k tokens (beyond gpt-3.5-turbo's 16,385 context).
    huge = scalar(conn, "SELECT body FROM posts WHERE length(body) > 100000 LIMIT 1")
    assert len(tokens.get_encoding("cl100k_base").encode(huge)) > 20_000
    assert HUGE_BODY_WORDS > 20_000


def test_rows_look_real(conn: psycopg.Connection[Any]) -> None:
    seed_posts(conn, 2_000, end=END, days=7, personas=5, bad_fraction=0.0, model_ids=["a", "b"])
    assert scalar(conn, "SELECT count(DISTINCT persona_id) FROM posts") == 5
    assert scalar(conn, "SELECT max(ts) FROM posts") < END
    in_window = scalar(conn, "SELECT count(*) FROM posts WHERE ts >= %s", END - timedelta(days=7))
    # ~10% are older history, outside the window.
    assert 1_600 < in_window < 1_950
    mean = scalar(conn, "SELECT avg(engagement_rate) FROM posts")
    assert 0.05 < mean < 0.07
    # Personas differ in engagement level.
    spread = scalar(
        conn,
        "SELECT max(m) - min(m) FROM (SELECT avg(engagement_rate) AS m FROM posts GROUP BY persona_id) AS p",
    )
    assert spread > 0.01
    assert scalar(conn, "SELECT min(engagement_rate) FROM posts") >= 0.0
    assert scalar(conn, "SELECT max(engagement_rate) FROM posts") <= 1.0
    words = conn.execute(
        "SELECT min(array_length(regexp_split_to_array(body, '\\s+'), 1)),"
        " max(array_length(regexp_split_to_array(body, '\\s+'), 1)) FROM posts"
    ).fetchone()
    assert words is not None and 40 <= words[0] and words[1] <= 150
    # Varied: almost every post is distinct.
    assert scalar(conn, "SELECT count(DISTINCT (hook, body)) FROM posts") == 2_000
    assert scalar(conn, "SELECT count(DISTINCT hook) FROM posts") > 500
    arms = dict(conn.execute("SELECT model_id, count(*) FROM posts GROUP BY model_id").fetchall())
    assert arms == {"a": 1_000, "b": 1_000}
    nulls = conn.execute(
        "SELECT count(*) FROM posts WHERE tokens_used IS NULL OR response_time_ms IS NULL"
        " OR quality_score IS NULL OR cost_usd IS NULL"
    ).fetchone()
    assert nulls == (0,)


def test_default_model_is_the_baseline(conn: psycopg.Connection[Any]) -> None:
    seed_posts(conn, 50, end=END)
    assert conn.execute("SELECT DISTINCT model_id FROM posts").fetchall() == [("gpt-3.5-turbo-0125",)]


def test_deterministic_by_seed(conn: psycopg.Connection[Any]) -> None:
    seed_posts(conn, 1_500, end=END, seed=7)
    first = scalar(conn, ROWS_DIGEST_SQL)
    conn.execute("TRUNCATE posts")
    seed_posts(conn, 1_500, end=END, seed=7)
    assert scalar(conn, ROWS_DIGEST_SQL) == first
    conn.execute("TRUNCATE posts")
    seed_posts(conn, 1_500, end=END, seed=8)
    assert scalar(conn, ROWS_DIGEST_SQL) != first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"end": datetime(2026, 11, 1)}, "timezone-aware"),
        ({"end": END, "bad_fraction": 1.5}, "bad_fraction"),
        ({"end": END, "model_ids": []}, "model_ids"),
        ({"end": END, "days": 0}, "days"),
    ],
)
def test_rejects_bad_arguments(conn: psycopg.Connection[Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        seed_posts(conn, 10, **kwargs)
