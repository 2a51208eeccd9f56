"""Collection against a real PostgreSQL: filter, order, limit, window, rejections, atomic file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from fine_tuning.infra import db
from fine_tuning.collect import tokens
from fine_tuning.collect.dataset import REJECTION_REASONS, _rejection, collect_training_data
from fine_tuning.config import PipelineConfig, load_config
from fine_tuning.manifests import CollectManifest, RunContext
from fine_tuning.dev.seed import seed_posts

WINDOW_END = datetime(2026, 11, 1, tzinfo=UTC)
IN_WINDOW = WINDOW_END - timedelta(days=2)
BODY_PROMPT = "{hook}\n\nWrite a detailed post:"
HOOK_PROMPT = "Create engaging content"


def cookbook_count(messages: list[dict[str, str]], encoding: str) -> int:
    """The expected count, outside the counter under test: OpenAI's cookbook rule ("How to count
    tokens with tiktoken": 3 per message, its values' tokens, 3 to prime the reply) written here,
    on the packaged encoding (test_tokens checks it against tiktoken's published token ids, and
    the product's counter against the cookbook's published counts)."""
    enc = tokens.get_encoding(encoding)
    return 3 + sum(3 + sum(len(enc.encode_ordinary(value)) for value in m.values()) for m in messages)


@pytest.fixture
def conn(pg_url: str) -> Iterator[psycopg.Connection[Any]]:
    with db.connect(pg_url, autocommit=True) as connection:
        db.migrate(connection)
        yield connection


def make_config(pg_url: str, **params: Any) -> PipelineConfig:
    # No validation split unless a test asks for one: these tests count the training file.
    return load_config(
        env={},
        params={
            "training_data_threshold": 10,
            "data_collection.validation_share": 0.0,
            **params,
            "services": {"database_url": pg_url},
        },
    )


def run(config: PipelineConfig, out: Path, window_end: datetime = WINDOW_END) -> CollectManifest:
    return collect_training_data(config, RunContext(dag_id="dag", run_id="run_1", window_end=window_end), out)


def post(
    i: int,
    engagement: float | None,
    *,
    ts: datetime = IN_WINDOW,
    hook: str | None = None,
    body: str | None = None,
    persona: str = "p1",
) -> dict[str, Any]:
    return {
        "persona_id": persona,
        "hook": f"Hook number {i}: why this matters" if hook is None else hook,
        "body": f"Body of post {i}, with a few honest words about the topic." if body is None else body,
        "engagement_rate": engagement,
        "ts": ts,
    }


def insert(conn: psycopg.Connection[Any], rows: Iterable[dict[str, Any]]) -> None:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO posts (persona_id, hook, body, engagement_rate, ts)"
            " VALUES (%(persona_id)s, %(hook)s, %(body)s, %(engagement_rate)s, %(ts)s)",
            list(rows),
        )


def read_lines(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def written_hooks(path: str | Path) -> list[str]:
    """The assistant content of every hook example (the even lines)."""
    return [line["messages"][2]["content"] for line in read_lines(path)[::2]]


def test_writes_best_posts_first_as_chat_jsonl(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    engagements = {i: 0.005 + i / 100 for i in range(30)}  # 0.005 ... 0.295
    insert(conn, (post(i, e, persona=f"p{i % 3}") for i, e in engagements.items()))
    config = make_config(pg_url, engagement_threshold=0.06)

    manifest = run(config, tmp_path)

    passing = sorted((i for i, e in engagements.items() if e >= 0.06), key=lambda i: -engagements[i])
    assert manifest.status == "ready"
    assert manifest.posts_scanned == len(passing) == 24
    assert manifest.examples_written == 48
    assert manifest.rejected == dict.fromkeys(REJECTION_REASONS, 0)
    assert manifest.duplicates == 0
    assert (manifest.window_start, manifest.window_end) == (WINDOW_END - timedelta(days=7), WINDOW_END)
    assert (manifest.dag_id, manifest.run_id, manifest.min_examples) == ("dag", "run_1", 10)
    assert manifest.reason is None

    # Filter and order: the hooks are the passing posts, best first.
    expected = [f"Hook number {i}: why this matters" for i in passing]
    assert written_hooks(tmp_path / "dataset.jsonl") == expected

    lines = read_lines(tmp_path / "dataset.jsonl")
    assert len(lines) == 48
    token_sum = 0
    for index, line in enumerate(lines):
        assert list(line) == ["messages"]
        messages = line["messages"]
        assert [m["role"] for m in messages] == ["system", "user", "assistant"]
        assert all(set(m) == {"role", "content"} for m in messages)
        assert messages[0]["content"].startswith("You write social posts as persona p")
        token_sum += cookbook_count(messages, "cl100k_base")  # gpt-3.5-turbo-0125's
        if index % 2 == 0:
            assert messages[1]["content"] == HOOK_PROMPT
        else:
            hook = lines[index - 1]["messages"][2]["content"]
            assert messages[1]["content"] == BODY_PROMPT.format(hook=hook)
            assert messages[2]["content"].startswith("Body of post ")
    assert manifest.tokens == token_sum
    assert manifest.token_counter == "tiktoken cl100k_base (gpt-3.5-turbo-0125)"

    data = (tmp_path / "dataset.jsonl").read_bytes()
    assert manifest.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.bytes == len(data)
    assert manifest.dataset_path == str(tmp_path / "dataset.jsonl")
    # The manifest is on disk too, and nothing else is left behind (no temp files).
    assert CollectManifest.from_json((tmp_path / "collect.json").read_text()) == manifest
    assert sorted(os.listdir(tmp_path)) == ["collect.json", "dataset.jsonl"]


def test_limit_keeps_the_best(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    insert(conn, (post(i, 0.1 + i / 1000) for i in range(40)))
    manifest = run(make_config(pg_url, max_records=6), tmp_path)
    assert manifest.posts_scanned == 6
    assert manifest.examples_written == 12
    assert written_hooks(tmp_path / "dataset.jsonl") == [
        f"Hook number {i}: why this matters" for i in range(39, 33, -1)
    ]


def test_window_is_the_runs_own(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    start = WINDOW_END - timedelta(days=7)
    this_week = [post(i, 0.2, ts=start + timedelta(hours=12 * i)) for i in range(6)]
    edges = [
        post(100, 0.9, ts=start),  # the start is included
        post(101, 0.9, ts=start - timedelta(seconds=1)),  # just before: excluded
        post(102, 0.9, ts=WINDOW_END),  # the end is excluded
        post(103, 0.9, ts=WINDOW_END + timedelta(days=1)),
    ]
    last_week = [post(200 + i, 0.3, ts=start - timedelta(days=1, hours=i)) for i in range(5)]
    insert(conn, [*this_week, *edges, *last_week])
    config = make_config(pg_url)

    current = run(config, tmp_path / "current")
    assert sorted(written_hooks(tmp_path / "current" / "dataset.jsonl")) == sorted(
        p["hook"] for p in [*this_week, edges[0]]
    )
    assert current.posts_scanned == 7

    # A backfill of the previous week collects that week (and its edge post just before start).
    backfill = run(config, tmp_path / "backfill", window_end=start)
    assert backfill.window_start == start - timedelta(days=7)
    assert sorted(written_hooks(tmp_path / "backfill" / "dataset.jsonl")) == sorted(
        p["hook"] for p in [*last_week, edges[1]]
    )


def test_every_rejection_reason_and_duplicates(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    good = [post(i, 0.1 + i / 1000) for i in range(10)]
    bad = [
        post(20, math.nan),  # nan_engagement (NaN >= 0.06 in PostgreSQL, and sorts first)
        post(21, math.inf),  # engagement_out_of_range
        post(22, 1.7),  # engagement_out_of_range
        post(23, -0.2),  # filtered in SQL: never scanned
        post(24, None),  # NULL counts as 0: filtered in SQL with a 6% threshold
        post(25, 0.5, hook=""),  # empty_hook
        post(26, 0.5, hook=" \t\n "),  # empty_hook
        post(27, 0.5, hook=None),  # replaced below by a real NULL
        post(28, 0.5, body=""),  # empty_body
        post(29, 0.5, body="   "),  # empty_body
        post(30, 0.5, hook="Caf\ufffd culture, explained"),  # invalid_text (broken decode)
        post(31, 0.5, body="Ring the bell\x07 now"),  # invalid_text (control character)
        post(32, 0.5, persona="p\x1b[31m"),  # invalid_text in the persona (goes into the prompt)
        post(33, 0.5, body="lorem " * 17_000),  # too_long: > 16,385 tokens for gpt-3.5-turbo
        # Duplicates of good[0]: case and whitespace differ, still the same post.
        post(34, 0.05 + 0.06, hook="  HOOK number 0:   why this matters ", body=good[0]["body"].upper()),
        post(35, 0.3, hook=good[0]["hook"], body=" " + good[0]["body"].replace(" ", "\n")),
    ]
    bad[7]["hook"] = None
    insert(conn, [*good, *bad])

    manifest = run(make_config(pg_url), tmp_path)

    assert manifest.rejected == {
        "empty_hook": 3,
        "empty_body": 2,
        "nan_engagement": 1,
        "engagement_out_of_range": 2,
        "too_long": 1,
        "invalid_text": 3,
        "mostly_pii": 0,
    }
    assert manifest.duplicates == 2
    assert manifest.posts_scanned == len(good) + len(bad) - 2
    assert manifest.examples_written == 2 * len(good) - 2 + 2  # one of the three copies is kept
    lines = read_lines(tmp_path / "dataset.jsonl")
    assert len(lines) == manifest.examples_written
    # The best of the copies (0.3) is the one kept, with its own text.
    assert good[0]["body"] not in [line["messages"][2]["content"] for line in lines]


def test_lines_are_json_dumps_of_the_messages(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    """Lines are put together from JSON strings; they must be exactly what json.dumps writes."""
    tricky = [
        'She said "ship it" \\ then left',
        "Tabs\tand\nnew lines\r\nin one post",
        "Café, naïve, 東京, emoji 🚀, and a line separator \u2028 here",
        "</script><!-- {not: a template} {hook} -->",
        "Zero\u200bwidth, right-to-left \u05e9\u05dc\u05d5\u05dd, and a lone \\u escape",
    ]
    insert(
        conn,
        [
            post(i, 0.1 + i / 100, hook=text, body=f"Body: {text}", persona='p"q\\')
            for i, text in enumerate(tricky)
        ],
    )

    manifest = run(make_config(pg_url), tmp_path)

    raw = (tmp_path / "dataset.jsonl").read_text(encoding="utf-8").split("\n")
    assert raw.pop() == ""  # the file ends with a newline
    assert len(raw) == manifest.examples_written == 2 * len(tricky)
    for line in raw:
        assert line == json.dumps(json.loads(line), ensure_ascii=False)
    assert {json.loads(line)["messages"][2]["content"] for line in raw[::2]} == set(tricky)
    assert json.loads(raw[0])["messages"][0]["content"] == 'You write social posts as persona p"q\\.'


def test_chunk_size_changes_nothing_but_the_fetches(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path
) -> None:
    """Rows are validated, counted and written a chunk at a time; duplicates and too-long posts
    that straddle chunks must come out as they do in one chunk."""
    seed_posts(conn, 3_000, end=WINDOW_END)
    one_chunk = run(make_config(pg_url, chunk_size=5_000), tmp_path / "one")
    small_chunks = run(make_config(pg_url, chunk_size=7), tmp_path / "small")

    assert one_chunk.duplicates > 0 and one_chunk.rejected["too_long"] > 0
    fields = ("posts_scanned", "examples_written", "rejected", "duplicates", "tokens", "bytes", "sha256")
    assert {f: getattr(small_chunks, f) for f in fields} == {f: getattr(one_chunk, f) for f in fields}


def test_null_engagement_counts_as_zero(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    insert(conn, [post(i, 0.1) for i in range(5)] + [post(9, None)])
    manifest = run(make_config(pg_url, engagement_threshold=0.0), tmp_path)
    assert manifest.posts_scanned == 6
    # NULLS LAST: the unscored post comes after every scored one.
    assert written_hooks(tmp_path / "dataset.jsonl")[-1] == "Hook number 9: why this matters"


@pytest.mark.parametrize(
    ("hook", "body", "engagement", "reason"),
    [
        ("ok", "ok", -0.2, "engagement_out_of_range"),
        ("ok", "ok", -math.inf, "engagement_out_of_range"),
        ("ok", "ok", math.nan, "nan_engagement"),
        ("lone \ud800 surrogate", "ok", 0.1, "invalid_text"),  # PostgreSQL cannot even store it
        ("ok", "nul\x00byte", 0.1, "invalid_text"),
        ("ok", "c1 \x85 control", 0.1, "invalid_text"),
        (None, "ok", 0.1, "empty_hook"),
        ("ok", "\u3000\n", 0.1, "empty_body"),  # ideographic space is whitespace too
        ("multi\nline\twith\rreturns", "ok", 0.1, None),
        ("émoji 🎉 and 日本語", "ok", None, None),
    ],
)
def test_rejection_rules(
    hook: str | None, body: str | None, engagement: float | None, reason: str | None
) -> None:
    assert _rejection("p1", hook, body, engagement) == reason


def test_too_few_examples_leaves_no_file(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    # A dataset from an earlier try of this run must not survive an "insufficient" verdict.
    (tmp_path / "dataset.jsonl").write_text("stale\n")
    insert(conn, [post(i, 0.2) for i in range(3)] + [post(9, 0.01)])

    manifest = run(make_config(pg_url, training_data_threshold=10), tmp_path)

    assert manifest.status == "insufficient"
    assert manifest.examples_written == 6
    assert (
        manifest.reason
        == "only 6 valid training examples, 10 needed (data_collection.training_data_threshold)"
    )
    assert (manifest.dataset_path, manifest.sha256, manifest.bytes) == (None, None, 0)
    assert sorted(os.listdir(tmp_path)) == ["collect.json"]
    assert CollectManifest.from_json((tmp_path / "collect.json").read_text()).status == "insufficient"


def test_dataset_is_replaced_atomically(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    insert(conn, [post(i, 0.2) for i in range(6)])
    config = make_config(pg_url)
    first = run(config, tmp_path)
    dataset = tmp_path / "dataset.jsonl"
    first_inode = dataset.stat().st_ino

    insert(conn, [post(i, 0.3) for i in range(10, 14)])
    second = run(config, tmp_path)
    assert second.sha256 != first.sha256
    assert second.sha256 == hashlib.sha256(dataset.read_bytes()).hexdigest()
    # A new file renamed over the old one, not the old one rewritten in place.
    assert dataset.stat().st_ino != first_inode
    assert sorted(os.listdir(tmp_path)) == ["collect.json", "dataset.jsonl"]

    # A failed try leaves the previous dataset as it was, and no temp file.
    broken = make_config(pg_url.replace("/test", "/no_such_database_for_collect"))
    with pytest.raises(psycopg.OperationalError):
        run(broken, tmp_path)
    assert hashlib.sha256(dataset.read_bytes()).hexdigest() == second.sha256
    assert sorted(os.listdir(tmp_path)) == ["collect.json", "dataset.jsonl"]


def test_bad_inputs_fail_before_any_work(pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        run(make_config(pg_url), tmp_path, window_end=datetime(2026, 11, 1))
    with pytest.raises(ValueError, match="body_prompt"):
        run(make_config(pg_url, **{"data_collection.body_prompt": "{hook} and {tone}"}), tmp_path)
    with pytest.raises(tokens.UnknownModelError, match="my-own-llm"):
        run(make_config(pg_url, base_model="my-own-llm"), tmp_path)
    assert list(tmp_path.iterdir()) == []


# Under the selfhosted provider, tokens are counted with the base model's own tokenizer.


@pytest.fixture(scope="module")
def tiny_base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base model directory whose tokenizer was trained offline on post-like text."""
    pytest.importorskip("transformers")
    from fine_tuning.dev.tiny_model import build_tiny_tokenizer

    directory = tmp_path_factory.mktemp("tiny-base")
    sample = directory / "sample.jsonl"
    examples = (
        [{"role": "user", "content": HOOK_PROMPT}, {"role": "assistant", "content": post(i, 0.1)["hook"]}]
        for i in range(20)
    )
    sample.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in examples))
    build_tiny_tokenizer(sample, directory / "model")
    return directory / "model"


def test_selfhosted_collect_counts_with_the_base_models_tokenizer(
    conn: psycopg.Connection[Any],
    pg_url: str,
    tmp_path: Path,
    tiny_base_model: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user on self-hosted training sets the provider and the base model path, nothing about
    OpenAI: the count is what the trainer will see (the model's chat template, tokenized)."""
    from transformers import AutoTokenizer

    insert(conn, (post(i, 0.1) for i in range(12)))
    config = make_config(
        pg_url,
        training_provider="selfhosted",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        training={"selfhosted": {"base_model_path": str(tiny_base_model)}},
    )
    with caplog.at_level("INFO", logger="fine_tuning.collect.dataset"):
        manifest = run(config, tmp_path)

    assert manifest.status == "ready" and manifest.examples_written == 24
    assert manifest.token_counter == f"{tiny_base_model / 'tokenizer.json'} with its chat template"
    reference = AutoTokenizer.from_pretrained(tiny_base_model)
    examples = [line["messages"] for line in read_lines(tmp_path / "dataset.jsonl")]
    expected = sum(
        len(reference.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        for messages in examples
    )
    assert manifest.tokens == expected
    assert manifest.tokens != sum(cookbook_count(messages, "o200k_base") for messages in examples)
    on_disk = CollectManifest.from_json((tmp_path / "collect.json").read_text())
    assert on_disk.token_counter == manifest.token_counter
    said = [r.getMessage() for r in caplog.records if "counts tokens with" in r.getMessage()]
    assert said == [f"collect counts tokens with {manifest.token_counter}"]  # once, not per example


def test_selfhosted_collect_leaves_out_posts_longer_than_the_trainers_max_length(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path, tiny_base_model: Path
) -> None:
    """The self-hosted trainer cuts examples at max_length; collection leaves such posts out
    instead (as it does at an OpenAI model's context), whatever training.base_model says."""
    from transformers import AutoTokenizer

    words = "small wins compound every morning"
    insert(conn, (post(i, 0.1 + i / 100, body=" ".join([words] * (1 + i % 4 * 10))) for i in range(24)))
    selfhosted = {"base_model_path": str(tiny_base_model), "max_length": 120}
    config = make_config(
        pg_url,
        training_provider="selfhosted",
        base_model="gpt-3.5-turbo-0125",
        training={"selfhosted": selfhosted},
    )
    manifest = run(config, tmp_path)

    reference = AutoTokenizer.from_pretrained(tiny_base_model)
    lengths = [
        len(reference.apply_chat_template(line["messages"], tokenize=True, return_dict=True)["input_ids"])
        for line in read_lines(tmp_path / "dataset.jsonl")
    ]
    # The 6 posts with a one-phrase body fit in 120 tokens; the 18 with 11 to 31 phrases do not.
    assert (manifest.rejected["too_long"], manifest.examples_written) == (18, 12)
    bodies = {line["messages"][2]["content"] for line in read_lines(tmp_path / "dataset.jsonl")[1::2]}
    assert bodies == {words}
    assert max(lengths) <= 120 < 16_385  # not gpt-3.5-turbo's context


def test_selfhosted_collect_without_the_base_model_approximates_once_and_records_it(
    conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """In kubernetes mode the collect pod has neither the base model volume nor ``tokenizers``."""
    insert(conn, (post(i, 0.1) for i in range(12)))
    missing = tmp_path / "models" / "qwen"
    config = make_config(
        pg_url,
        training_provider="selfhosted",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        training={"selfhosted": {"base_model_path": str(missing)}},
    )
    with caplog.at_level("INFO", logger="fine_tuning.collect.dataset"):
        manifest = run(config, tmp_path / "out")

    assert manifest.status == "ready"
    assert manifest.token_counter == (
        "tiktoken o200k_base (approximation: no tokenizer.json in "
        f"training.selfhosted.base_model_path {missing})"
    )
    lines = read_lines(tmp_path / "out" / "dataset.jsonl")
    assert manifest.tokens == sum(cookbook_count(line["messages"], "o200k_base") for line in lines)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    said = f"collect token counts are approximate: {manifest.token_counter}"
    assert [r.getMessage() for r in warnings] == [said]


# Runs collect in a fresh process and reports how far its resident memory rose above the level
# it had after imports and the tokenizer load (a sampler thread sees the peak).
_MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys, threading
    from datetime import datetime
    import psutil
    from fine_tuning.collect import tokens
    from fine_tuning.collect.dataset import collect_training_data
    from fine_tuning.config import load_config
    from fine_tuning.manifests import RunContext

    url, out, threshold = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = load_config(env={}, params={
        "max_records": 100_000, "engagement_threshold": threshold, "services": {"database_url": url}})
    tokens.encoding_for_model(config.training.base_model)
    process = psutil.Process()
    baseline = peak = process.memory_info().rss
    done = threading.Event()

    def sample():
        global peak
        while not done.wait(0.005):
            peak = max(peak, process.memory_info().rss)

    sampler = threading.Thread(target=sample)
    sampler.start()
    manifest = collect_training_data(
        config, RunContext(dag_id="dag", run_id="scale", window_end=datetime.fromisoformat(sys.argv[4])), out)
    done.set()
    sampler.join()
    peak = max(peak, process.memory_info().rss)
    print(json.dumps({"growth_mb": (peak - baseline) / 2**20, "scanned": manifest.posts_scanned,
                      "written": manifest.examples_written, "bytes": manifest.bytes}))
    """
)


def test_memory_stays_flat_at_100k_posts(conn: psycopg.Connection[Any], pg_url: str, tmp_path: Path) -> None:
    """90k posts (~85 MB of JSONL) stream through in ~30 MB; keeping the rows instead was
    measured at ~120 MB."""
    seed_posts(conn, 100_000, end=WINDOW_END)
    done = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, pg_url, str(tmp_path), "0.0", WINDOW_END.isoformat()],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["scanned"] > 85_000
    assert result["bytes"] > 50 * 2**20
    assert result["growth_mb"] < 60, result


# The schema collection relies on (db.migrate).


def test_migrate_is_idempotent_and_safe_in_parallel(pg_url: str) -> None:
    """Two processes migrating one schema at once: one applies, the other waits and applies
    nothing; running again changes nothing. The overlap is forced, not hoped for: the test holds
    the schema's migration lock until both migrators are seen waiting on it in pg_stat_activity."""
    import time

    results: list[list[str]] = []

    def migrate_once() -> None:
        with db.connect(pg_url) as connection:
            results.append(db.migrate(connection))

    with db.connect(pg_url) as holder, holder.transaction():
        holder.execute(db._LOCK_SQL)
        threads = [threading.Thread(target=migrate_once) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        waiting = 0
        while waiting < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
            waiting = holder.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
                " AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                "             AND objid = (SELECT objid FROM pg_locks WHERE pid = pg_backend_pid()"
                "                          AND locktype = 'advisory' AND granted))"
            ).fetchone()[0]
        assert waiting == 2, "both migrators should be waiting on the lock the test holds"
        assert results == []  # neither got past the lock
    for thread in threads:
        thread.join(30)
    every = [m.name for m in db.load_migrations()]
    assert sorted(results) == [[], every]

    with db.connect(pg_url, autocommit=True) as connection:
        assert db.migrate(connection) == []
        applied = connection.execute("SELECT name FROM schema_migrations ORDER BY version").fetchall()
        assert [name for (name,) in applied] == every
        indexes = connection.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'posts' AND schemaname = current_schema()"
        ).fetchall()
        assert any("(ts)" in index for (index,) in indexes)


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_word_count_is_a_lower_bound_on_tokens(encoding: str) -> None:
    """collect rejects huge texts by word count without tokenizing them; that is only sound if
    no text has fewer tokens than whitespace-separated words."""
    samples = [
        "lorem " * 2_000,
        "a b c d e f g",
        "I'm sure they've said it's fine, haven't they?",
        "1234567 89 0.5% $100,000 -- ... !!! ??",
        "日本語 の テキスト 🎉 🎉🎉 émoji café naïve",
        "x\ny\tz\r\nw  \n\n  v",
        "<|endoftext|> <|fim_prefix|> http://example.com/a/b?c=d",
        " ".join(chr(c) for c in range(0x21, 0x2FF) if not chr(c).isspace()),
    ]
    model = "gpt-3.5-turbo" if encoding == "cl100k_base" else "gpt-4o"
    assert tokens.encoding_for_model(model).name == encoding
    for text in samples:
        assert len(text.split()) <= len(tokens.get_encoding(encoding).encode_ordinary(text)), text[:40]
