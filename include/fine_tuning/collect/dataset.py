"""Step 1: stream the window's best posts out of PostgreSQL into OpenAI chat fine-tuning JSONL.

One parameterized query filters, orders and limits in SQL; a server-side cursor hands the rows
over in chunks; each chunk is validated, scrubbed of personal data (``collect.pii``),
de-duplicated, counted and written before the next is fetched. Memory is flat in the number of
posts (only 8-byte digests for de-duplication and ~18 bytes per self-generated post grow,
bounded by ``max_records``), and the files appear atomically, with their checksums, or not at
all.

What a post becomes, in order: a row rejection (``rejected``, by reason, ``mostly_pii``
among them); a duplicate post (both examples dropped) or a duplicate hook (the hook example
dropped, the body kept); an example of the validation file (``validation_share`` of the posts,
by post id) or of the training file; posts written by the pipeline's own fine-tuned models
(a ``model_id`` that was an A/B candidate) wait in a side file and are down-sampled, by post id,
to ``self_generated_cap`` of the examples once the pass is over. Dedup is exact on a normalised
form (whitespace collapsed, case folded, PII replaced); near-duplicates by MinHash are not
done: a signature per text costs more than collection's whole per-post budget in Python, and
its LSH index grows with the data, which flat memory rules out.
"""

from __future__ import annotations

import array
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
from fine_tuning.collect.pii import PiiScrubber
from fine_tuning.config import PipelineConfig
from fine_tuning.infra import db
from fine_tuning.manifests import CollectManifest, RunContext, SelfGeneratedShare, write_manifest

log = logging.getLogger(__name__)

DATASET_NAME = "dataset.jsonl"
VALIDATION_NAME = "validation.jsonl"
MANIFEST_NAME = "collect.json"

REJECTION_REASONS = (
    "empty_hook",
    "empty_body",
    "nan_engagement",
    "engagement_out_of_range",
    "too_long",
    "invalid_text",
    "mostly_pii",
)
# Examples not written although their post was valid, by reason (``dropped_examples``).
DROP_REASONS = ("duplicate_post", "duplicate_hook", "self_generated_cap")

# The one query. NaN engagement is deliberately *not* excluded here: in PostgreSQL 'NaN' is
# greater than every number, so NaN rows pass the threshold and sort first; Python sees them,
# rejects and counts them (a NaN rate is a bug in the agent's scoring job that someone should
# hear about). Because they sort first they are always counted, even when LIMIT truncates;
# excluding them in SQL would need a second query or a window count over the whole window to
# still report them. Their cost is a few LIMIT slots, like any other rejected row.
# NULL engagement counts as 0 (COALESCE), so it only passes a threshold of 0.
# self_generated: the post's model is one the pipeline trained (every model it trains is an A/B
# candidate before it gets traffic, so ab_tests names them all, whatever the provider); a small
# table, hashed once per query. The id breaks ties: the same data gives the same file.
COLLECT_QUERY = """
    SELECT id, persona_id, hook, body, engagement_rate,
           COALESCE(model_id IN (SELECT candidate_model FROM ab_tests), false) AS self_generated
    FROM posts
    WHERE ts >= %(start)s AND ts < %(end)s
      AND COALESCE(engagement_rate, 0) >= %(threshold)s
    ORDER BY engagement_rate DESC NULLS LAST, id
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


def _digests(persona_id: str, hook: str, body: str) -> tuple[int, int]:
    """The post's identity (hook and body) and its hook example's (the persona, whose system
    message it carries, and the hook), on the normalised texts."""
    # 64 bits: a collision among even 10M posts has probability ~3e-6, and an int costs ~40
    # bytes in the set where the full texts would cost kilobytes.
    normal_hook = _normalize(hook)
    post = hashlib.blake2b(f"{normal_hook}\0{_normalize(body)}".encode(), digest_size=8).digest()
    hook_example = hashlib.blake2b(f"{persona_id}\0{normal_hook}".encode(), digest_size=8).digest()
    return int.from_bytes(post, "big"), int.from_bytes(hook_example, "big")


def post_unit(post_id: int, purpose: str) -> float:
    """A uniform number in [0, 1) fixed by the post id (and what it decides): the validation
    split and the self-generated down-sampling choose by it, so a rerun chooses the same posts,
    and the two choices are independent of each other."""
    raw = hashlib.blake2b(f"{purpose}\0{post_id}".encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big") / 2.0**64


def _non_blank(text: str) -> int:
    return len(text) - sum(text.count(blank) for blank in " \t\n\r")


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
        # (digest, hook digest, persona_id, hook, body, body prompt, post id, self-generated) per
        # post that passed validation, texts scrubbed; the body prompt is None for a post surely
        # too long (no examples are built for it).
        self.posts: list[tuple[int, int, str, str, str, str | None, int, bool]] = []
        # The hook and body example of every post not surely too long, in that order.
        self.examples: list[list[dict[str, str]]] = []


class _JsonlOut:
    """One output file being written: its handle, sha256, size and counts, as lines stream by."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.examples = self.tokens = self.bytes = 0

    def write(self, lines: bytes, examples: int, tokens: int) -> None:
        self.handle.write(lines)
        self.sha256.update(lines)
        self.bytes += len(lines)
        self.examples += examples
        self.tokens += tokens


class _SelfGenerated:
    """Posts written by the pipeline's own models, held back until the pass is over: their lines
    in a side file, and per post (in arrival order) what the cap needs to choose, ~18 bytes."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.keys = array.array("d")  # post_unit(id, "self_generated_cap"): lowest kept first
        self.sizes = array.array("L")  # bytes of the post's lines in the side file
        self.examples = array.array("B")  # 1 or 2 (a duplicate hook is not written)
        self.tokens = array.array("L")
        self.validation = array.array("B")  # 1: the post belongs to the validation split

    def add(self, post_id: int, lines: bytes, examples: int, tokens: int, validation: bool) -> None:
        self.handle.write(lines)
        self.keys.append(post_unit(post_id, "self_generated_cap"))
        self.sizes.append(len(lines))
        self.examples.append(examples)
        self.tokens.append(tokens)
        self.validation.append(validation)

    def keep(self, budget: int) -> np.ndarray:
        """Which posts to keep (a bool per post): the lowest keys while their examples fit ``budget``."""
        keys = np.frombuffer(self.keys, dtype=np.float64)
        order = np.argsort(keys, kind="stable")
        examples = np.frombuffer(self.examples, dtype=np.uint8).astype(np.int64)
        fits = np.cumsum(examples[order]) <= budget
        kept = np.zeros(len(keys), dtype=bool)
        kept[order[fits]] = True
        return kept


class _DatasetBuilder:
    """Turns rows into examples and writes them: validation, PII scrubbing, de-duplication,
    token counts, the split, and the files' sha256 and size, all computed as the lines stream by.

    Each fetched chunk goes through two passes: ``first_pass`` validates, scrubs and
    fingerprints the rows and builds their examples; their tokens are counted as one batch (the
    counter tokenizes each distinct text once: the system messages and prompts repeat); then
    ``second_pass`` decides, in query order, what is written. ``finish`` applies the
    self-generated cap.

    Counting is half of the time and stays on this thread. tiktoken releases the GIL while it
    encodes, but takes it back after every text; a counting thread next to this busy one waits
    a switch interval (5 ms) per text (measured: 300 s for what takes 1.9 s alone).
    """

    def __init__(
        self,
        training: IO[bytes],
        validation: IO[bytes],
        side: IO[bytes],
        config: PipelineConfig,
        counter: tokens.ChatTokenCounter,
    ) -> None:
        settings = config.data_collection
        self.training = _JsonlOut(training)
        self.validation = _JsonlOut(validation)
        self._self_generated = _SelfGenerated(side)
        self._hook_prompt = settings.hook_prompt
        self._body_prompt = settings.body_prompt
        self._hook_prompt_json = _json_string(self._hook_prompt)
        self._system_json: dict[str, str] = {}  # persona_id -> its system message, JSON-encoded
        self._counter = counter
        self._context_limit = config.training.context_limit()
        self._validation_share = settings.validation_share
        self._cap = settings.self_generated_cap
        pii = settings.pii
        self._scrubber = PiiScrubber(pii.kinds, pii.keep_handles, pii.phone_regions)
        self._max_pii_share = pii.max_pii_share
        # Digests of the posts and hook examples written so far: the only state that grows
        # (bounded by max_records) besides the self-generated posts' few bytes each.
        self._seen = _DigestSet()
        self._hooks_seen = _DigestSet()
        self.rejected: Counter[str] = Counter(dict.fromkeys(REJECTION_REASONS, 0))
        self.dropped: Counter[str] = Counter(dict.fromkeys(DROP_REASONS, 0))
        self.pii_found: Counter[str] = Counter(dict.fromkeys(pii.kinds, 0))
        self.duplicates = self.posts_scanned = 0
        self.self_generated = SelfGeneratedShare(cap=self._cap)

    def _scrubbed(self, hook: str, body: str) -> tuple[str, str] | None:
        """Hook and body with their PII replaced; None when the post is mostly PII."""
        scrub = self._scrubber.scrub
        hook_result, body_result = scrub(hook), scrub(body)
        if hook_result is None and body_result is None:
            return hook, body
        pii_chars = 0
        for result in (hook_result, body_result):
            if result is not None:
                self.pii_found.update(result.found)
                pii_chars += result.pii_chars
        if pii_chars > self._max_pii_share * max(_non_blank(hook) + _non_blank(body), 1):
            return None
        return (
            hook if hook_result is None else hook_result.text,
            body if body_result is None else body_result.text,
        )

    def first_pass(self, rows: list[tuple[Any, ...]]) -> _Chunk:
        """Count the invalid rows by reason; scrub and fingerprint the rest and build their examples."""
        chunk = _Chunk()
        words_bound = self._counter.words_bound_tokens
        limit = self._context_limit
        for post_id, persona_id, raw_hook, raw_body, engagement, self_generated in rows:
            reason = _rejection(persona_id, raw_hook, raw_body, engagement)
            if reason is not None:
                self.rejected[reason] += 1
                continue
            scrubbed = self._scrubbed(raw_hook, raw_body)
            if scrubbed is None:
                self.rejected["mostly_pii"] += 1
                continue
            hook, body = scrubbed
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
            chunk.posts.append(
                (
                    *_digests(persona_id, hook, body),
                    persona_id,
                    hook,
                    body,
                    body_prompt,
                    post_id,
                    bool(self_generated),
                )
            )
        self.posts_scanned += len(rows)
        return chunk

    def second_pass(self, chunk: _Chunk, counts: list[int]) -> None:
        """Write each post's examples, in query order, or count why not.

        Exactly what one pass per row would do: a repeat of a post already written is a
        duplicate (even when it is also too long), and a post is written only when both of its
        examples fit the context. A post whose hook example (persona and hook) was written
        already gives its body example alone.
        """
        at = 0
        for digest, hook_digest, persona_id, hook, body, body_prompt, post_id, self_generated in chunk.posts:
            if body_prompt is not None:
                hook_tokens, body_tokens = counts[at], counts[at + 1]
                at += 2
            if digest in self._seen:
                self.duplicates += 1
                self.dropped["duplicate_post"] += 2
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
            body_line = _line(system, _json_string(body_prompt), body)
            if hook_digest in self._hooks_seen:
                self.dropped["duplicate_hook"] += 1
                lines, examples, post_tokens = body_line, 1, body_tokens
            else:
                self._hooks_seen.add(hook_digest)
                lines = _line(system, self._hook_prompt_json, hook) + body_line
                examples, post_tokens = 2, hook_tokens + body_tokens
            validation = (
                self._validation_share > 0 and post_unit(post_id, "validation") < self._validation_share
            )
            if self_generated:
                self._self_generated.add(post_id, lines, examples, post_tokens, validation)
            else:
                (self.validation if validation else self.training).write(lines, examples, post_tokens)

    def finish(self, side_path: Path) -> None:
        """Apply the cap: keep self-generated posts (lowest ``post_unit`` first) while their
        examples stay within ``cap`` of all examples written, and append them to their files."""
        pending = self._self_generated
        pending.handle.flush()
        own = int(sum(pending.examples))
        others = self.training.examples + self.validation.examples
        if self._cap >= 1.0:
            budget = own
        else:
            # own_kept / (others + own_kept) <= cap; the epsilon keeps an exact bound (0.5 of
            # 10 is 5) from being lost to rounding.
            budget = min(own, math.floor(self._cap * others / (1.0 - self._cap) + 1e-9))
        kept = pending.keep(budget)
        with side_path.open("rb") as side:
            for index, size in enumerate(pending.sizes):
                lines = side.read(size)
                if kept[index]:
                    out = self.validation if pending.validation[index] else self.training
                    out.write(lines, pending.examples[index], pending.tokens[index])
        kept_examples = int(np.frombuffer(pending.examples, dtype=np.uint8)[kept].sum()) if own else 0
        self.dropped["self_generated_cap"] += own - kept_examples
        total = others + kept_examples
        self.self_generated = SelfGeneratedShare(
            cap=self._cap,
            posts=len(pending.sizes),
            posts_kept=int(kept.sum()),
            examples_before_cap=own,
            examples_kept=kept_examples,
            share_before_cap=round(own / (others + own), 6) if others + own else 0.0,
            share_written=round(kept_examples / total, 6) if total else 0.0,
        )


def _line(system_json: str, prompt_json: str, answer: str) -> bytes:
    # Byte for byte json.dumps({"messages": [...]}, ensure_ascii=False) (a test checks), put
    # together from the JSON strings: the system message and prompts repeat, and building
    # and walking three dicts per line was a tenth of collection's time. Only the
    # "messages" key: OpenAI rejects unknown keys in some validations.
    return (
        f'{{"messages": [{{"role": "system", "content": {system_json}}}, '
        f'{{"role": "user", "content": {prompt_json}}}, '
        f'{{"role": "assistant", "content": {_json_string(answer)}}}]}}\n'
    ).encode()


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
    rows are counted by reason in ``rejected``, repeated posts in ``duplicates``, examples not
    written in ``dropped_examples``; the validation split goes to ``out_dir/validation.jsonl``.
    With fewer training examples than ``training_data_threshold`` the status is "insufficient"
    and no dataset file is left behind (``examples_written`` and ``tokens`` then say what
    *would* have been written). The manifest is also written to ``out_dir/collect.json``.
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

    # Unique temp names in the same directory (same filesystem, so the renames are atomic): a
    # reader never sees a partial dataset, and a failed try leaves the previous files intact.
    validation_path = out / VALIDATION_NAME
    temps: list[Path] = []

    def temp(name: str) -> tuple[IO[bytes], Path]:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out)
        temps.append(Path(tmp_name))
        return os.fdopen(fd, "wb"), Path(tmp_name)

    try:
        training_handle, training_tmp = temp(DATASET_NAME)
        validation_handle, validation_tmp = temp(VALIDATION_NAME)
        side_handle, side_tmp = temp("self_generated")
        with training_handle, validation_handle, side_handle:
            builder = _DatasetBuilder(training_handle, validation_handle, side_handle, config, counter)
            database_url = config.services.database_url.get_secret_value()
            chunks = _stream_posts(database_url, params, settings.chunk_size)
            with contextlib.closing(chunks):
                for rows in chunks:
                    chunk = builder.first_pass(rows)
                    builder.second_pass(chunk, counter.count_many(chunk.examples))
                    del rows, chunk  # free this chunk before the next one is fetched
            builder.finish(side_tmp)
            for handle in (training_handle, validation_handle):
                handle.flush()
                os.fsync(handle.fileno())
        training, validation = builder.training, builder.validation
        ready = training.examples >= settings.training_data_threshold
        has_validation = ready and validation.examples > 0
        if ready:
            os.replace(training_tmp, dataset_path)
        else:
            # A file from an earlier try of this run must not outlive the verdict.
            dataset_path.unlink(missing_ok=True)
        if has_validation:
            os.replace(validation_tmp, validation_path)
        else:
            validation_path.unlink(missing_ok=True)
        _fsync_directory(out)
    finally:
        for path in temps:
            path.unlink(missing_ok=True)
    if ready and settings.validation_share > 0 and not has_validation:
        log.warning(
            "collect %s/%s: data_collection.validation_share=%s chose no post for validation; "
            "the job has no validation loss and the loss gate cannot judge it",
            ctx.dag_id,
            ctx.run_id,
            settings.validation_share,
        )

    manifest = CollectManifest(
        status="ready" if ready else "insufficient",
        dag_id=ctx.dag_id,
        run_id=ctx.run_id,
        window_start=window_start,
        window_end=window_end,
        dataset_path=str(dataset_path) if ready else None,
        sha256=training.sha256.hexdigest() if ready else None,
        bytes=training.bytes if ready else 0,
        posts_scanned=builder.posts_scanned,
        examples_written=training.examples,
        rejected=dict(builder.rejected),
        duplicates=builder.duplicates,
        tokens=training.tokens,
        min_examples=settings.training_data_threshold,
        seconds=round(time.perf_counter() - started, 3),
        token_counter=counter.description,
        reason=None
        if ready
        else (
            f"only {training.examples} valid training examples, {settings.training_data_threshold} "
            "needed (data_collection.training_data_threshold)"
        ),
        dropped_examples=dict(builder.dropped),
        pii_found=dict(builder.pii_found),
        self_generated=builder.self_generated,
        validation_path=str(validation_path) if has_validation else None,
        validation_sha256=validation.sha256.hexdigest() if has_validation else None,
        validation_examples=validation.examples,
        validation_tokens=validation.tokens,
        validation_bytes=validation.bytes if has_validation else 0,
        query=" ".join(COLLECT_QUERY.split()),
    )
    write_manifest(manifest, out / MANIFEST_NAME)
    log.info(
        "collect %s/%s [%s, %s): status=%s scanned=%d written=%d validation=%d duplicates=%d "
        "rejected=%s dropped=%s pii=%s self_generated=%.3f->%.3f tokens=%d bytes=%d in %.2fs",
        ctx.dag_id,
        ctx.run_id,
        window_start.isoformat(),
        window_end.isoformat(),
        manifest.status,
        manifest.posts_scanned,
        manifest.examples_written,
        manifest.validation_examples,
        manifest.duplicates,
        ",".join(f"{reason}:{count}" for reason, count in manifest.rejected.items()),
        ",".join(f"{reason}:{count}" for reason, count in manifest.dropped_examples.items()),
        ",".join(f"{kind}:{count}" for kind, count in manifest.pii_found.items()),
        builder.self_generated.share_before_cap,
        builder.self_generated.share_written,
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
