"""Step 1: stream the window's best posts out of PostgreSQL into OpenAI chat fine-tuning JSONL.

One parameterized query filters, orders and limits in SQL; a server-side cursor hands the rows
over in chunks; each chunk is validated, counted and written before the next is fetched. Memory
is flat in the number of posts (only a set of 8-byte digests for de-duplication grows, bounded
by ``max_records``), and the file appears atomically, with its checksum, or not at all.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections import Counter
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np

from fine_tuning.collect import tokens
from fine_tuning.config import PipelineConfig
from fine_tuning.infra import db
from fine_tuning.manifests import CollectManifest, RunContext, write_manifest

log = logging.getLogger(__name__)

DATASET_NAME = "dataset.jsonl"
MANIFEST_NAME = "collect.json"

REJECTION_REASONS = (
    "empty_hook",
    "empty_body",
    "nan_engagement",
    "engagement_out_of_range",
    "too_long",
    "invalid_text",
)

# The one query. NaN engagement is deliberately *not* excluded here: in PostgreSQL 'NaN' is
# greater than every number, so NaN rows pass the threshold and sort first; Python sees them,
# rejects and counts them (a NaN rate is a bug in the agent's scoring job that someone should
# hear about). Because they sort first they are always counted, even when LIMIT truncates;
# excluding them in SQL would need a second query or a window count over the whole window to
# still report them. Their cost is a few LIMIT slots, like any other rejected row.
# NULL engagement counts as 0 (COALESCE), so it only passes a threshold of 0.
COLLECT_QUERY = """
    SELECT persona_id, hook, body, engagement_rate
    FROM posts
    WHERE ts >= %(start)s AND ts < %(end)s
      AND COALESCE(engagement_rate, 0) >= %(threshold)s
    ORDER BY engagement_rate DESC NULLS LAST
    LIMIT %(max_records)s
"""

# Control characters other than \t \n \r (C0, DEL, C1), U+FFFD left by a broken decode, and
# surrogate code points (a lone surrogate cannot be encoded as UTF-8; PostgreSQL's UTF8 never
# yields one, but a row of another origin could). One regex pass is much cheaper than encoding.
_INVALID_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd\ud800-\udfff]")


def _system_message(persona_id: str) -> str:
    return f"You write social posts as persona {persona_id}."


def _normalize(text: str) -> str:
    """Whitespace collapsed and case folded: what makes two posts the same post."""
    return " ".join(text.split()).casefold()


def _digest(hook: str, body: str) -> int:
    # 64 bits: a collision among even 10M posts has probability ~3e-6, and an int costs ~40
    # bytes in the set where the full texts would cost kilobytes.
    raw = hashlib.blake2b(f"{_normalize(hook)}\0{_normalize(body)}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big")


class _DigestSet:
    """A set of 64-bit digests at ~8 bytes each, where a Python set of ints costs ~70.

    At 5M posts (2.3M digests) that is ~20 MiB instead of ~160 MiB. New digests wait in a small
    set; every 32k of them are merged into 256 sorted arrays (bucketed by the top byte, so a merge
    copies one small bucket at a time, never the whole set), which are searched by bisection:
    ~1 us per post more than a set.
    """

    _MERGE_AT = 1 << 15

    def __init__(self) -> None:
        self._recent: set[int] = set()
        self._buckets: list[memoryview] = [np.empty(0, dtype=np.uint64).data] * 256

    def __contains__(self, digest: int) -> bool:
        if digest in self._recent:
            return True
        bucket = self._buckets[digest >> 56]
        index = bisect.bisect_left(bucket, digest)
        return index < len(bucket) and bucket[index] == digest

    def add(self, digest: int) -> None:
        self._recent.add(digest)
        if len(self._recent) >= self._MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        new = np.fromiter(self._recent, dtype=np.uint64, count=len(self._recent))
        self._recent.clear()
        new.sort()
        starts = new.searchsorted(np.arange(1, 256, dtype=np.uint64) << np.uint64(56))
        for number, part in enumerate(np.split(new, starts)):
            if part.size:
                old = np.frombuffer(self._buckets[number], dtype=np.uint64)
                self._buckets[number] = np.insert(old, old.searchsorted(part), part).data


def _surely_over(text: str, limit: int) -> bool:
    """True when ``text`` alone has more than ``limit`` tokens, decided without tokenizing.

    OpenAI's pre-tokenizers (cl100k, o200k) never put two whitespace-separated words into one
    piece, and every piece is at least one token, so the word count is a lower bound on the
    token count. Tokenizing a 100k-word body only to reject it costs ~15 ms and a list of 100k
    ints; counting words in a bounded prefix costs a fraction of that (a prefix never has more
    words than the whole text). Texts shorter than ``limit`` characters cannot have more words.
    Only used when the counter's tokenizer has that property (``words_bound_tokens``).
    """
    if len(text) <= limit:
        return False
    return len(text[: limit * 16].split()) > limit


# json.dumps(text, ensure_ascii=False) without the encoder object around it.
_json_string = json.encoder.encode_basestring


def _is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


class _Chunk:
    """One fetch of rows after the first pass: the posts that may become examples, in query
    order, and the examples whose tokens are to be counted."""

    def __init__(self) -> None:
        # (digest, persona_id, hook, body, body prompt) per post that passed validation; the
        # body prompt is None for a post surely too long (no examples are built for it).
        self.posts: list[tuple[int, str, str, str, str | None]] = []
        # The hook and body example of every post not surely too long, in that order.
        self.examples: list[list[dict[str, str]]] = []


class _DatasetBuilder:
    """Turns rows into examples and writes them: validation, de-duplication, token counts, and
    the file's sha256 and size, all computed as the lines stream by.

    Each fetched chunk goes through two passes: ``first_pass`` validates and fingerprints the
    rows and builds their examples; their tokens are counted as one batch (the counter
    tokenizes each distinct text once: the system messages and prompts repeat); then
    ``second_pass`` decides, in query order, what is written.

    Counting is half of the time and stays on this thread. tiktoken releases the GIL while it
    encodes, but takes it back after every text; a counting thread next to this busy one waits
    a switch interval (5 ms) per text (measured: 300 s for what takes 1.9 s alone).
    """

    def __init__(self, handle: IO[bytes], config: PipelineConfig, counter: tokens.ChatTokenCounter) -> None:
        self._handle = handle
        self._sha256 = hashlib.sha256()
        self._hook_prompt = config.data_collection.hook_prompt
        self._body_prompt = config.data_collection.body_prompt
        self._hook_prompt_json = _json_string(self._hook_prompt)
        self._system_json: dict[str, str] = {}  # persona_id -> its system message, JSON-encoded
        self._counter = counter
        self._context_limit = config.training.context_limit()
        # Digests of the posts written so far: the only state that grows (bounded by max_records).
        self._seen = _DigestSet()
        self.rejected: Counter[str] = Counter(dict.fromkeys(REJECTION_REASONS, 0))
        self.duplicates = self.posts_scanned = self.examples_written = self.tokens = self.bytes = 0

    def first_pass(self, rows: list[tuple[Any, ...]]) -> _Chunk:
        """Count the invalid rows by reason; fingerprint the rest and build their examples."""
        chunk = _Chunk()
        words_bound = self._counter.words_bound_tokens
        limit = self._context_limit
        for persona_id, hook, body, engagement in rows:
            reason = _rejection(persona_id, hook, body, engagement)
            if reason is not None:
                self.rejected[reason] += 1
                continue
            over = words_bound and (_surely_over(hook, limit) or _surely_over(body, limit))
            body_prompt = None
            if not over:
                body_prompt = self._body_prompt.format(hook=hook)
                system = {"role": "system", "content": _system_message(persona_id)}
                chunk.examples.append(
                    [
                        system,
                        {"role": "user", "content": self._hook_prompt},
                        {"role": "assistant", "content": hook},
                    ]
                )
                chunk.examples.append(
                    [
                        system,
                        {"role": "user", "content": body_prompt},
                        {"role": "assistant", "content": body},
                    ]
                )
            chunk.posts.append((_digest(hook, body), persona_id, hook, body, body_prompt))
        self.posts_scanned += len(rows)
        return chunk

    def second_pass(self, chunk: _Chunk, counts: list[int]) -> None:
        """Write each post's hook and body examples, in query order, or count why not.

        Exactly what one pass per row would do: a repeat of a post already written is a
        duplicate (even when it is also too long), and a post is written only when both of its
        examples fit the context.
        """
        at = 0
        for digest, persona_id, hook, body, body_prompt in chunk.posts:
            if body_prompt is not None:
                hook_tokens, body_tokens = counts[at], counts[at + 1]
                at += 2
            if digest in self._seen:
                self.duplicates += 1
                continue
            # A post is one unit: its engagement scores hook and body together, so a post whose
            # body is too long does not contribute its hook alone either.
            if body_prompt is None or max(hook_tokens, body_tokens) > self._context_limit:
                self.rejected["too_long"] += 1
                continue
            self._seen.add(digest)
            system = self._system_json.get(persona_id)
            if system is None:
                system = self._system_json[persona_id] = _json_string(_system_message(persona_id))
            self._write(system, self._hook_prompt_json, hook)
            self._write(system, _json_string(body_prompt), body)
            self.examples_written += 2
            self.tokens += hook_tokens + body_tokens

    def _write(self, system_json: str, prompt_json: str, answer: str) -> None:
        # Byte for byte json.dumps({"messages": [...]}, ensure_ascii=False) (a test checks), put
        # together from the JSON strings: the system message and prompts repeat, and building
        # and walking three dicts per line was a tenth of collection's time. Only the
        # "messages" key: OpenAI rejects unknown keys in some validations.
        line = (
            f'{{"messages": [{{"role": "system", "content": {system_json}}}, '
            f'{{"role": "user", "content": {prompt_json}}}, '
            f'{{"role": "assistant", "content": {_json_string(answer)}}}]}}\n'
        ).encode()
        self._handle.write(line)
        self._sha256.update(line)
        self.bytes += len(line)

    def hexdigest(self) -> str:
        return self._sha256.hexdigest()


# Aim of a fetch's size in text characters (hook + body), when chunk_size rows would exceed it.
_CHUNK_BYTES = 4 << 20


def _stream_posts(
    database_url: str, params: dict[str, object], chunk_size: int
) -> Generator[list[tuple[Any, ...]]]:
    """Yield the rows of COLLECT_QUERY in chunks of at most ``chunk_size``, fetched through a
    server-side cursor in a read-only transaction: the client never holds more than one chunk.

    Posts differ in size by orders of magnitude (a 150 KB body among 500-byte ones, and such
    outliers sort together), so a fetch takes fewer rows when the last chunk's were wide: a chunk
    stays near ``_CHUNK_BYTES`` (measured: peak RSS -40 MiB on the seeded data, whatever N).
    """
    with db.connect(database_url) as conn:
        conn.read_only = True  # the next transaction is BEGIN READ ONLY
        with conn.transaction():
            # A cursor is planned for its first 10% of rows by default, which favours ordered
            # index walks (measured 3x slower with an engagement_rate index); we always read
            # every row, so plan for all of them.
            conn.execute("SET LOCAL cursor_tuple_fraction = 1.0")
            with conn.cursor(name="collect_training_data") as cursor:
                cursor.execute(COLLECT_QUERY, params)
                rows_per_fetch = chunk_size
                while rows := cursor.fetchmany(rows_per_fetch):
                    text_bytes = sum(len(row[1] or "") + len(row[2] or "") for row in rows)
                    rows_per_fetch = max(1, min(chunk_size, _CHUNK_BYTES * len(rows) // max(text_bytes, 1)))
                    yield rows
                    del rows  # free this chunk before the next one arrives


def _fsync_directory(path: Path) -> None:
    """Make a rename in ``path`` durable (the rename lives in the directory's metadata)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_prompts(config: PipelineConfig) -> None:
    """Fail before touching the database when body_prompt cannot be formatted with a hook."""
    try:
        config.data_collection.body_prompt.format(hook="hook")
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(
            f"data_collection.body_prompt {config.data_collection.body_prompt!r} must use only "
            f"the {{hook}} placeholder (escape other braces as {{{{ }}}}): {exc!r}"
        ) from None


def collect_training_data(config: PipelineConfig, ctx: RunContext, out_dir: str | Path) -> CollectManifest:
    """Collect the run's window of posts into ``out_dir/dataset.jsonl``; return the manifest.

    The window is the run's own, ``[window_end - days_back, window_end)``, so a backfill
    collects its own week. Each valid post yields a hook example and a body example; invalid
    rows are counted by reason in ``rejected``, repeated posts in ``duplicates``. With fewer
    valid examples than ``training_data_threshold`` the status is "insufficient" and no dataset
    file is left behind (``examples_written`` and ``tokens`` then say what *would* have been
    written). The manifest is also written to ``out_dir/collect.json``.
    """
    started = time.perf_counter()
    settings = config.data_collection
    window_end = ctx.window_end
    if window_end.tzinfo is None or window_end.utcoffset() is None:
        raise ValueError(f"RunContext.window_end must be timezone-aware, got {window_end.isoformat()}")
    window_start = window_end - timedelta(days=settings.days_back)
    _check_prompts(config)
    # The provider's tokenizer; an unknown OpenAI model fails here, before any work.
    counter = tokens.chat_token_counter(config.training)
    if counter.exact:
        log.info("collect counts tokens with %s", counter.description)
    else:
        log.warning("collect token counts are approximate: %s", counter.description)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dataset_path = out / DATASET_NAME
    params: dict[str, object] = {
        "start": window_start,
        "end": window_end,
        "threshold": settings.engagement_threshold,
        "max_records": settings.max_records,
    }

    # A unique temp name in the same directory (same filesystem, so the rename is atomic): a
    # reader never sees a partial dataset, and a failed try leaves the previous file intact.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{DATASET_NAME}.", suffix=".tmp", dir=out)
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            builder = _DatasetBuilder(handle, config, counter)
            database_url = config.services.database_url.get_secret_value()
            chunks = _stream_posts(database_url, params, settings.chunk_size)
            with contextlib.closing(chunks):
                for rows in chunks:
                    chunk = builder.first_pass(rows)
                    builder.second_pass(chunk, counter.count_many(chunk.examples))
                    del rows, chunk  # free this chunk before the next one is fetched
            handle.flush()
            os.fsync(handle.fileno())
        ready = builder.examples_written >= settings.training_data_threshold
        if ready:
            os.replace(tmp_path, dataset_path)
            _fsync_directory(out)
        else:
            tmp_path.unlink()
            # A file from an earlier try of this run must not outlive the verdict.
            dataset_path.unlink(missing_ok=True)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise

    manifest = CollectManifest(
        status="ready" if ready else "insufficient",
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        window_start=window_start,
        window_end=window_end,
        dataset_path=str(dataset_path) if ready else None,
        sha256=builder.hexdigest() if ready else None,
        bytes=builder.bytes if ready else 0,
        posts_scanned=builder.posts_scanned,
        examples_written=builder.examples_written,
        rejected=dict(builder.rejected),
        duplicates=builder.duplicates,
        tokens=builder.tokens,
        min_examples=settings.training_data_threshold,
        seconds=round(time.perf_counter() - started, 3),
        token_counter=counter.description,
        reason=None
        if ready
        else (
            f"only {builder.examples_written} valid examples, {settings.training_data_threshold} "
            "needed (data_collection.training_data_threshold)"
        ),
    )
    write_manifest(manifest, out / MANIFEST_NAME)
    log.info(
        "collect %s/%s [%s, %s): status=%s scanned=%d written=%d duplicates=%d rejected=%s "
        "tokens=%d bytes=%d in %.2fs",
        ctx.dag_id,
        ctx.run_id,
        window_start.isoformat(),
        window_end.isoformat(),
        manifest.status,
        manifest.posts_scanned,
        manifest.examples_written,
        manifest.duplicates,
        ",".join(f"{reason}:{count}" for reason, count in manifest.rejected.items()),
        manifest.tokens,
        manifest.bytes,
        manifest.seconds,
    )
    return manifest


def _rejection(persona_id: str, hook: str | None, body: str | None, engagement: float | None) -> str | None:
    """Why a row cannot make a valid example (the first reason that applies), or None."""
    if engagement is not None:
        if math.isnan(engagement):
            return "nan_engagement"
        if math.isinf(engagement) or not 0.0 <= engagement <= 1.0:
            return "engagement_out_of_range"
    if _is_blank(hook):
        return "empty_hook"
    if _is_blank(body):
        return "empty_body"
    assert hook is not None and body is not None  # _is_blank ruled out None
    if _INVALID_TEXT.search(hook) or _INVALID_TEXT.search(body) or _INVALID_TEXT.search(persona_id):
        return "invalid_text"
    return None
