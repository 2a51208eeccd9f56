"""What collection lets through into the files: no PII, no duplicate example, a capped share of
self-generated posts, and a validation split by post id (against a real PostgreSQL)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fine_tuning.collect.dataset import collect_training_data, post_unit
from fine_tuning.collect.pii import PiiScrubber
from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.dev.seed import BASELINE_MODEL_ID, seed_posts
from fine_tuning.infra import db
from fine_tuning.manifests import CollectManifest, RunContext

WINDOW_END = datetime(2026, 11, 1, tzinfo=UTC)
IN_WINDOW = WINDOW_END - timedelta(days=2)
OWN_MODEL = "ft:gpt-3.5-turbo-0125:org:weekly:own123"

# One of every kind, each passing its check (Luhn, mod 97, a valid number of its region).
PII = {
    "email": "jane.doe+news@mailbox.example.org",
    "phone": "+44 20 7946 0958",
    "credit_card": "4111 1111 1111 1111",
    "iban": "DE89 3704 0044 0532 0130 00",
    "ip_address": "192.168.10.23",
    "handle": "@jane_private",
}


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(pg_url, autocommit=True) as connection:
        db.migrate(connection)
        yield connection


def make_config(pg_url: str, **collection: Any) -> PipelineConfig:
    settings = {"training_data_threshold": 10, "validation_share": 0.0, **collection}
    return load_config(env={}, params={"data_collection": settings, "services": {"database_url": pg_url}})


def run(config: PipelineConfig, out: Path, run_id: str = "run_1") -> CollectManifest:
    return collect_training_data(config, RunContext(dag_id="dag", run_id=run_id, window_end=WINDOW_END), out)


def insert(conn: psycopg.Connection[Any], rows: Iterable[dict[str, Any]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO posts (persona_id, hook, body, engagement_rate, ts, model_id)"
            " VALUES (%(persona_id)s, %(hook)s, %(body)s, %(engagement_rate)s, %(ts)s, %(model_id)s)",
            list(rows),
        )


def post(i: int, engagement: float = 0.2, **fields: Any) -> dict[str, Any]:
    return {
        "persona_id": "p1",
        "hook": f"Hook number {i}: why this matters",
        "body": f"Body of post {i}, with a few honest words about the topic at hand.",
        "engagement_rate": engagement,
        "ts": IN_WINDOW,
        "model_id": BASELINE_MODEL_ID,
        **fields,
    }


def own_model_tested(conn: psycopg.Connection[Any], model: str = OWN_MODEL) -> None:
    """An A/B test of ``model``: what makes its posts self-generated."""
    conn.execute(
        "INSERT INTO ab_tests (id, model_type, baseline_model, candidate_model, traffic_split,"
        " started_at, planned_end_at, status, success_criteria, power_plan)"
        " VALUES (%s, 'body', %s, %s, 0.1, %s, %s, 'promote', '{}', '{}')",
        (f"ab-{model[-6:]}", BASELINE_MODEL_ID, model, IN_WINDOW - timedelta(days=9), IN_WINDOW),
    )


def lines(path: str | Path | None) -> list[str]:
    return [] if path is None else Path(path).read_text(encoding="utf-8").splitlines()


def answers(path: str | Path | None) -> list[str]:
    return [json.loads(line)["messages"][2]["content"] for line in lines(path)]


def test_pii_of_every_kind_is_replaced_by_its_placeholder(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    insert(conn, [post(i) for i in range(10)])
    insert(
        conn,
        [
            post(
                100,
                0.5,
                hook=f"Big news from {PII['handle']} and @OurBrand today",
                body=(
                    f"Mail {PII['email']} or ring {PII['phone']}. Pay with {PII['credit_card']}, or wire "
                    f"to {PII['iban']}; our old box was {PII['ip_address']} and 2001:db8::8a2e:370:7334. "
                    "It was a long story about a garden, a dog, a storm and the neighbours who helped; "
                    "they came over with sandbags, soup and a ladder, and stayed until the rain stopped."
                ),
            )
        ],
    )
    config = make_config(pg_url, pii={"keep_handles": ["OurBrand"]})

    with caplog.at_level("DEBUG"):
        manifest = run(config, tmp_path)

    assert manifest.pii_found == {
        "email": 1,
        "phone": 1,
        "credit_card": 1,
        "iban": 1,
        "ip_address": 2,
        "handle": 1,
    }
    written = (tmp_path / "dataset.jsonl").read_text(encoding="utf-8")
    everything = written + (tmp_path / "collect.json").read_text() + caplog.text
    for value in [*PII.values(), "2001:db8::8a2e:370:7334", "jane_private"]:
        assert value not in everything
    scrubbed = [a for a in answers(tmp_path / "dataset.jsonl") if "<EMAIL>" in a]
    assert scrubbed == [
        "Mail <EMAIL> or ring <PHONE>. Pay with <CREDIT_CARD>, or wire to <IBAN>; our old box was "
        "<IP_ADDRESS> and <IP_ADDRESS>. It was a long story about a garden, a dog, a storm and the "
        "neighbours who helped; they came over with sandbags, soup and a ladder, and stayed until the "
        "rain stopped."
    ]
    assert "Big news from <HANDLE> and @OurBrand today" in answers(tmp_path / "dataset.jsonl")
    assert manifest.examples_written == 22


def test_a_post_that_is_mostly_pii_is_left_out(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    insert(conn, [post(i) for i in range(10)])
    insert(conn, [post(100, 0.5, hook=f"DM {PII['handle']}", body=f"{PII['email']} {PII['phone']}")])

    manifest = run(make_config(pg_url), tmp_path)

    assert manifest.rejected["mostly_pii"] == 1
    assert manifest.examples_written == 20
    assert manifest.pii_found["email"] == 1  # found, counted, and nothing of it written
    assert PII["email"] not in (tmp_path / "dataset.jsonl").read_text()


def test_a_pii_kind_that_is_not_configured_stays(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    insert(conn, [post(i) for i in range(10)])
    insert(
        conn, [post(100, 0.5, body=f"Say hi to {PII['handle']} at {PII['email']} about the garden plans.")]
    )

    manifest = run(make_config(pg_url, pii={"kinds": ["email"]}), tmp_path)

    assert manifest.pii_found == {"email": 1}
    assert "Say hi to @jane_private at <EMAIL> about the garden plans." in answers(tmp_path / "dataset.jsonl")


def test_each_hook_and_body_example_is_written_once(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    insert(conn, [post(i) for i in range(10)])
    same_hook = "Three things nobody tells you about sourdough"
    insert(
        conn,
        [
            post(100, 0.5, hook=same_hook, body="First body: the starter needs patience and warmth."),
            post(
                101, 0.4, hook="  THREE things nobody tells you about   sourdough", body="Second body: flour."
            ),
            post(102, 0.3, hook=same_hook, body="Third body: the oven matters more than the recipe."),
            # Another persona's hook example has another system message: not a duplicate.
            post(103, 0.3, hook=same_hook, body="Fourth body, another voice.", persona_id="p2"),
            # Posts that differ only in their PII are the same post once scrubbed.
            post(
                104,
                0.3,
                hook="Recipe card",
                body=f"Write to {PII['email']} for the recipe card and the shopping list.",
            ),
            post(
                105,
                0.3,
                hook="Recipe card",
                body="Write to someone.else@mailbox.example.net for the recipe card and the shopping list.",
            ),
        ],
    )

    manifest = run(make_config(pg_url), tmp_path)

    written = lines(tmp_path / "dataset.jsonl")
    assert len(written) == len(set(written)) == manifest.examples_written
    assert manifest.dropped_examples == {"duplicate_post": 2, "duplicate_hook": 2, "self_generated_cap": 0}
    assert manifest.duplicates == 1
    assert manifest.examples_written == 20 + 2 + 1 + 1 + 2 + 2  # 100-103, then 104 (105 is 104)
    hooks = [a for a in answers(tmp_path / "dataset.jsonl") if "sourdough" in a.casefold() and "\n" not in a]
    assert sorted(hooks) == [same_hook, same_hook]  # p1's first (the best post) and p2's


def _self_generated_week(conn: psycopg.Connection[Any], own: int, others: int) -> None:
    """``own`` posts of the pipeline's model, all better than the ``others`` posts of the baseline."""
    own_model_tested(conn)
    insert(conn, [post(1000 + i, 0.5 + i / 10_000, model_id=OWN_MODEL) for i in range(own)])
    insert(conn, [post(i, 0.1 + i / 10_000) for i in range(others)])


@pytest.mark.parametrize(("cap", "own_kept"), [(0.5, 10), (0.25, 3), (0.0, 0), (1.0, 30)])
def test_self_generated_examples_are_capped(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path, cap: float, own_kept: int
) -> None:
    _self_generated_week(conn, own=30, others=10)

    manifest = run(make_config(pg_url, self_generated_cap=cap), tmp_path)

    share = manifest.self_generated
    assert share is not None
    assert (share.posts, share.examples_before_cap, share.share_before_cap) == (30, 60, 0.75)
    assert share.posts_kept == own_kept
    assert share.examples_kept == 2 * own_kept
    assert share.share_written <= cap
    assert manifest.dropped_examples["self_generated_cap"] == 60 - 2 * own_kept
    own_hooks = {a for a in answers(tmp_path / "dataset.jsonl") if a.startswith("Hook number 10")}
    assert len(own_hooks) == own_kept
    assert manifest.examples_written == 20 + 2 * own_kept


def test_the_cap_keeps_the_same_posts_on_a_rerun(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    _self_generated_week(conn, own=30, others=10)
    config = make_config(pg_url, self_generated_cap=0.4)

    first = run(config, tmp_path / "a")
    second = run(config, tmp_path / "b")

    assert first.sha256 == second.sha256
    # The kept ones are the lowest post_unit(id) of the own posts: a choice by post id, not by rank.
    with conn.cursor() as cur:
        ids = [row[0] for row in cur.execute("SELECT id FROM posts WHERE model_id = %s", (OWN_MODEL,))]
    kept_ids = sorted(ids, key=lambda i: post_unit(i, "self_generated_cap"))[
        : first.self_generated.posts_kept
    ]
    with conn.cursor() as cur:
        expected = {row[0] for row in cur.execute("SELECT hook FROM posts WHERE id = ANY(%s)", (kept_ids,))}
    assert {
        a for a in answers(tmp_path / "a" / "dataset.jsonl") if a.startswith("Hook number 10")
    } == expected


def test_validation_split_by_post_id(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    insert(conn, [post(i, 0.1 + i / 10_000) for i in range(200)])
    config = make_config(pg_url, validation_share=0.2)

    manifest = run(config, tmp_path)

    assert manifest.validation_path == str(tmp_path / "validation.jsonl")
    training, validation = lines(manifest.dataset_path), lines(manifest.validation_path)
    assert len(validation) == manifest.validation_examples and len(training) == manifest.examples_written
    assert len(training) + len(validation) == 400
    assert not set(training) & set(validation)
    with conn.cursor() as cur:
        rows = list(cur.execute("SELECT id, hook, body FROM posts"))
    chosen = {hook for post_id, hook, _ in rows if post_unit(post_id, "validation") < 0.2}
    assert 20 <= len(chosen) <= 60
    # Both examples of a validation post are in the validation file, and only there.
    in_validation = set(answers(manifest.validation_path))
    assert {hook for hook in chosen} <= in_validation
    assert {body for _, hook, body in rows if hook in chosen} <= in_validation
    assert not chosen & set(answers(manifest.dataset_path))
    assert manifest.validation_sha256 is not None and manifest.validation_tokens > 0


def test_a_seeded_week_with_hostile_rows_gives_clean_files(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    """The issue's done-when: most posts from the fine-tuned model, PII of every kind, duplicate
    hooks; no duplicate example, no PII, the cap held, and a validation file."""
    own_model_tested(conn)
    seed_posts(conn, 1500, end=WINDOW_END, model_ids=[OWN_MODEL, OWN_MODEL, OWN_MODEL, BASELINE_MODEL_ID])
    hostile = [
        post(5000 + i, 0.3, hook=f"Reach me {value} for the details", model_id=OWN_MODEL if i % 2 else "x")
        for i, value in enumerate(PII.values())
    ]
    hostile += [post(6000 + i, 0.25, hook="The one hook everybody copies") for i in range(5)]
    insert(conn, hostile)
    config = make_config(pg_url, validation_share=0.1, self_generated_cap=0.5)

    manifest = run(config, tmp_path)

    assert manifest.status == "ready"
    training, validation = lines(manifest.dataset_path), lines(manifest.validation_path)
    every = training + validation
    assert len(every) == len(set(every))
    text = "\n".join(every)
    for value in PII.values():
        assert value not in text
    assert all(manifest.pii_found[kind] >= 1 for kind in PII)
    share = manifest.self_generated
    assert share is not None and share.share_before_cap > 0.6
    assert share.share_written <= 0.5
    assert (
        share.examples_kept / (len(every)) == share.share_written
        or abs(share.examples_kept / len(every) - share.share_written) < 1e-6
    )
    assert manifest.dropped_examples["duplicate_hook"] >= 4
    assert (
        Counter(answers(manifest.dataset_path) + answers(manifest.validation_path))[
            "The one hook everybody copies"
        ]
        == 1
    )
    assert manifest.validation_examples > 0


def test_unknown_pii_kind_and_cap_out_of_range_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"data_collection\.pii\.kinds\.1: .*'ssn'"):
        load_config(env={}, params={"data_collection": {"pii": {"kinds": ["email", "ssn"]}}})
    with pytest.raises(ConfigError, match=r"data_collection\.self_generated_cap: .*1\.5"):
        load_config(env={}, params={"data_collection.self_generated_cap": 1.5})
    with pytest.raises(ConfigError, match=r"data_collection\.self_generated_cap: .*-0\.1"):
        load_config(env={}, params={"data_collection.self_generated_cap": -0.1})
    with pytest.raises(ConfigError, match=r"data_collection\.validation_share"):
        load_config(env={}, params={"data_collection.validation_share": 1.0})
    with pytest.raises(ConfigError, match=r"data_collection\.pii\.phone_regions\.0"):
        load_config(env={}, params={"data_collection": {"pii": {"phone_regions": ["uk"]}}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 4111 1111 1111 1112 failed Luhn", None),  # a typo in a card number is not caught
        ("meet at 12:30 or 18:45:10", None),  # times are not IPv6
        ("version 1.2.3 is out", None),
        ("mail me at ann@host.io", "mail me at <EMAIL>"),  # the @ of an e-mail is not a handle
        ("IBAN GB82WEST12345698765432.", "IBAN <IBAN>."),
        ("IBAN DE89 3704 0044 0532 0130 00 OK", "IBAN <IBAN> OK"),  # the word after is not in it
        ("call (415) 555-2671 now", "call <PHONE> now"),
        ("10 tips for 2026", None),
    ],
)
def test_scrubber_checks(text: str, expected: str | None) -> None:
    result = PiiScrubber(phone_regions=["US", "GB"]).scrub(text)
    assert (None if result is None else result.text) == expected
