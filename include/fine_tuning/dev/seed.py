"""Synthetic posts for development, the demo, tests and benchmarks.

The rows look like the content agent's: personas with their own voice and engagement level,
engagement rates around 6%, a week of timestamps plus older history, and a small share of the
bad rows real data has (NULL/NaN/out-of-range engagement, empty text, broken decodes, huge
bodies, duplicates) so that collection's rejections are exercised on every run.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import psycopg

BASELINE_MODEL_ID = "gpt-3.5-turbo-0125"

COLUMNS = (
    "persona_id",
    "hook",
    "body",
    "engagement_rate",
    "ts",
    "tokens_used",
    "model_id",
    "response_time_ms",
    "quality_score",
    "cost_usd",
)
_COPY_SQL = f"COPY posts ({', '.join(COLUMNS)}) FROM STDIN"

# The kinds of bad row, planted in this order, round robin, at evenly spaced positions: any
# seeding with at least len(BAD_KINDS) bad rows has every kind.
BAD_KINDS = (
    "null_engagement",
    "nan_engagement",
    "engagement_above_one",
    "engagement_negative",
    "empty_hook",
    "whitespace_hook",
    "empty_body",
    "whitespace_body",
    "replacement_char_hook",
    "huge_body",
    "duplicate",
)

# Share of posts older than the window: history that collection must leave out.
OLDER_FRACTION = 0.1
# Repetitions of a word in a huge body: ~24k tokens, over gpt-3.5-turbo's 16,385 context.
HUGE_BODY_WORDS = 24_000


@dataclass(frozen=True)
class Persona:
    """A voice: its own hook templates, sentence templates, vocabulary and engagement level."""

    name: str
    mean_engagement: float
    hook_templates: tuple[str, ...]
    sentence_templates: tuple[str, ...]
    nouns: tuple[str, ...]
    adjectives: tuple[str, ...]
    verbs: tuple[str, ...]


PERSONAS: tuple[Persona, ...] = (
    Persona(
        name="tech_optimist",
        mean_engagement=0.072,
        hook_templates=(
            "{n} {adj} ways {noun} will change how you work",
            "Why every team needs {adj} {noun} in {year}",
            "I tried {adj} {noun} for {n} days. Here is what happened",
            "Stop ignoring {noun}: it is more {adj} than you think",
        ),
        sentence_templates=(
            "The {adj} part of {noun} is how quickly it lets small teams {verb} real problems.",
            "Last quarter we used {noun} to {verb} our release process and nobody looked back.",
            "Most people underestimate how {adj} a good {noun} becomes once you {verb} it daily.",
            "If you can {verb} one thing this week, make it your {noun} and measure the result.",
            "Honestly, the {adj} {noun} we shipped last month still surprises our whole team.",
            "Engineers who {verb} their {noun} early tend to sleep better during launch week.",
        ),
        nouns=("automation", "AI assistant", "pipeline", "dashboard", "API", "workflow", "toolchain"),
        adjectives=("surprising", "underrated", "powerful", "simple", "fast", "elegant", "boring"),
        verbs=("automate", "simplify", "ship", "refactor", "measure", "scale", "debug"),
    ),
    Persona(
        name="fitness_coach",
        mean_engagement=0.065,
        hook_templates=(
            "{n} {adj} habits that fixed my {noun}",
            "Your {noun} is not the problem. Your routine is",
            "The {adj} truth about {noun} nobody tells beginners",
            "Do this before every {noun} session and thank me later",
        ),
        sentence_templates=(
            "Start with ten minutes of {noun} each morning and {verb} slowly from there.",
            "A {adj} {noun} routine beats a perfect plan that you abandon after a week.",
            "My clients who {verb} their {noun} consistently see progress within a month.",
            "Sleep, water and a {adj} {noun} matter more than any supplement you can buy.",
            "Track how you {verb} each {noun} so you can see the small wins add up.",
            "Rest days are part of the plan, not a failure to {verb} your {noun}.",
        ),
        nouns=("mobility", "squat", "cardio", "stretching", "posture", "recovery", "core"),
        adjectives=("simple", "painful", "honest", "steady", "gentle", "brutal", "sustainable"),
        verbs=("train", "improve", "track", "stretch", "strengthen", "rebuild", "repeat"),
    ),
    Persona(
        name="finance_skeptic",
        mean_engagement=0.048,
        hook_templates=(
            "Why I stopped trusting {adj} {noun} advice",
            "{n} {noun} myths that quietly cost you money",
            "The {adj} math behind {noun} that banks hope you skip",
            "Before you buy into {noun}, read this",
        ),
        sentence_templates=(
            "Every {adj} {noun} pitch sounds great until you {verb} the fees over ten years.",
            "I ran the numbers on {noun} and the {adj} result was not what I expected.",
            "You do not need to {verb} the market; you need a {adj} plan for your {noun}.",
            "Ask who profits when you {verb} your {noun} and the advice starts to make sense.",
            "A {adj} emergency fund protects you better than any clever {noun} strategy.",
            "Compound interest is {adj}, but only if you {verb} your {noun} for decades.",
        ),
        nouns=("index fund", "budget", "mortgage", "crypto", "pension", "credit card", "savings"),
        adjectives=("boring", "hidden", "expensive", "risky", "predictable", "misleading", "solid"),
        verbs=("compare", "calculate", "diversify", "question", "rebalance", "audit", "hold"),
    ),
    Persona(
        name="travel_storyteller",
        mean_engagement=0.06,
        hook_templates=(
            "I got lost in {noun} and found the {adj} trip of my life",
            "{n} {adj} lessons from a month on the road",
            "Nobody warned me about the {noun} in this {adj} town",
            "The {adj} {noun} I almost skipped",
        ),
        sentence_templates=(
            "We arrived at the {noun} just before sunset and the {adj} light changed everything.",
            "A stranger showed us how to {verb} the {noun} like locals do every weekend.",
            "The most {adj} moments happen when you {verb} without a plan for the {noun}.",
            "I still remember the {adj} smell of the {noun} market on that first morning.",
            "Pack less, {verb} more, and let the {noun} surprise you when it wants to.",
            "Our guide laughed when we tried to {verb} the {adj} {noun} on our own.",
        ),
        nouns=("harbor", "night train", "mountain village", "street market", "old town", "ferry", "desert"),
        adjectives=("quiet", "chaotic", "unforgettable", "tiny", "golden", "windy", "colorful"),
        verbs=("explore", "wander", "navigate", "photograph", "cross", "discover", "share"),
    ),
    Persona(
        name="food_critic",
        mean_engagement=0.055,
        hook_templates=(
            "This {adj} {noun} ruined every other version for me",
            "{n} {noun} mistakes home cooks make",
            "The {adj} secret behind restaurant-quality {noun}",
            "I ate {noun} at {n} places so you do not have to",
        ),
        sentence_templates=(
            "The {noun} arrived {adj} and fragrant, and the table went quiet for a minute.",
            "Most kitchens {verb} the {noun} too early, which is why it tastes flat.",
            "A pinch of salt and a {adj} pan will {verb} your {noun} more than any gadget.",
            "The chef told me to {verb} the {noun} twice, and now I understand why.",
            "Good {noun} is rarely {adj}; it is patient cooking and honest ingredients.",
            "If a menu cannot {verb} its {noun} well, skip the dessert and go home.",
        ),
        nouns=("ramen", "sourdough", "risotto", "curry", "dumplings", "omelette", "barbecue"),
        adjectives=("smoky", "overrated", "delicate", "crispy", "rich", "humble", "perfect"),
        verbs=("season", "rest", "sear", "taste", "balance", "simmer", "plate"),
    ),
)

_FILLERS = (
    "today",
    "again",
    "honestly",
    "for real",
    "this week",
    "every time",
    "at last",
    "right now",
    "in practice",
    "by the way",
    "no doubt",
    "step by step",
    "for once",
    "more often",
    "together",
)


def _persona(index: int) -> Persona:
    """The index-th persona; beyond the built-in voices, variants reuse them with new ids."""
    base = PERSONAS[index % len(PERSONAS)]
    if index < len(PERSONAS):
        return base
    # A variant's engagement level differs so personas remain distinguishable in aggregates.
    shift = ((index // len(PERSONAS)) % 5 - 2) * 0.004
    return Persona(
        name=f"{base.name}_{index // len(PERSONAS) + 1}",
        mean_engagement=max(0.01, base.mean_engagement + shift),
        hook_templates=base.hook_templates,
        sentence_templates=base.sentence_templates,
        nouns=base.nouns,
        adjectives=base.adjectives,
        verbs=base.verbs,
    )


def _sentence_pool(persona: Persona, rng: random.Random, size: int) -> list[tuple[str, int]]:
    """Pre-rendered sentences (12-20 words each) with their word counts: a body is then just a
    few random picks.

    Rendering templates per row would dominate seeding time at a million rows; a pool of a few
    hundred sentences per persona still gives billions of distinct bodies.
    """
    pool = []
    for _ in range(size):
        sentence = rng.choice(persona.sentence_templates).format(
            noun=rng.choice(persona.nouns), adj=rng.choice(persona.adjectives), verb=rng.choice(persona.verbs)
        )
        if rng.random() < 0.5:
            sentence = f"{sentence[:-1]}, {rng.choice(_FILLERS)}."
        pool.append((sentence, len(sentence.split())))
    return pool


def _hook(persona: Persona, rng: random.Random) -> str:
    return rng.choice(persona.hook_templates).format(
        n=rng.randint(3, 12),
        adj=rng.choice(persona.adjectives),
        noun=rng.choice(persona.nouns),
        year=rng.choice((2025, 2026, 2027)),
    )


def _rows(
    n_posts: int,
    *,
    end: datetime,
    days: int,
    personas: int,
    seed: int,
    bad_fraction: float,
    model_ids: Sequence[str],
) -> Iterator[tuple[Any, ...]]:
    """Yield the rows one at a time (nothing accumulates, so a million rows need no memory)."""
    rng = random.Random(seed)
    voices = [_persona(i) for i in range(personas)]
    pools = [_sentence_pool(voice, rng, 300) for voice in voices]
    window = timedelta(days=days).total_seconds()
    n_bad = round(n_posts * bad_fraction)
    # Bad rows sit at evenly spaced positions; `bad_every` is a float so n_bad is exact.
    bad_every = n_posts / n_bad if n_bad else math.inf
    next_bad, bad_index = 0.0, 0
    # The last good row that collection would see (in the window, engagement >= 6%): the
    # template for an exact duplicate.
    visible: tuple[Any, ...] | None = None

    for i in range(n_posts):
        p = i % personas
        voice, pool = voices[p], pools[p]
        hook = _hook(voice, rng)
        # Sentences until a target length: 40-150 words (a sentence has at most 20 words).
        target, words, parts = rng.randint(40, 130), 0, []
        while words < target:
            sentence, length = rng.choice(pool)
            parts.append(sentence)
            words += length
        body = " ".join(parts)
        mean = voice.mean_engagement
        # Beta with concentration 30: sd ~0.04 around the persona's mean, always in [0, 1].
        engagement: float | None = rng.betavariate(mean * 30, (1 - mean) * 30)
        older = rng.random() < OLDER_FRACTION
        age = window * (1 + 3 * rng.random()) if older else window * rng.random()
        ts = end - timedelta(seconds=age)
        model_id = model_ids[i % len(model_ids)]
        tokens_used = int(len(body) / 4.2 + len(hook) / 4.2) + 40
        response_time_ms = rng.lognormvariate(6.6, 0.35)  # median ~735 ms
        quality_score = min(1.0, max(0.0, rng.gauss(0.72, 0.1)))
        cost_usd = tokens_used * 2e-6

        kind = None
        if i >= next_bad and bad_index < n_bad:
            kind = BAD_KINDS[bad_index % len(BAD_KINDS)]
            bad_index += 1
            next_bad += bad_every
            # Bad rows land in the window with a high engagement so that collection meets them
            # and must reject them (NULL and negative rates below are still left out by its SQL
            # filter, as they would be in production).
            ts = end - timedelta(seconds=window * rng.random())
            engagement = rng.uniform(0.1, 0.3)

        if kind == "duplicate" and visible is not None:
            yield visible
            continue
        if kind == "null_engagement":
            engagement = None
        elif kind == "nan_engagement":
            engagement = math.nan
        elif kind == "engagement_above_one":
            engagement = 1.7
        elif kind == "engagement_negative":
            engagement = -0.2
        elif kind == "empty_hook":
            hook = ""
        elif kind == "whitespace_hook":
            hook = " \t "
        elif kind == "empty_body":
            body = ""
        elif kind == "whitespace_body":
            body = "\n  \n"
        elif kind == "replacement_char_hook":
            hook = hook.replace(" ", " \ufffd", 1)
        elif kind == "huge_body":
            body = "lorem " * HUGE_BODY_WORDS

        row: tuple[Any, ...] = (
            voice.name,
            hook,
            body,
            engagement,
            ts,
            tokens_used,
            model_id,
            response_time_ms,
            quality_score,
            cost_usd,
        )
        if kind is None and not older and engagement is not None and engagement >= 0.06:
            visible = row
        yield row


def seed_posts(
    conn: psycopg.Connection[Any],
    n_posts: int,
    *,
    end: datetime,
    days: int = 7,
    personas: int = 5,
    seed: int = 42,
    bad_fraction: float = 0.03,
    model_ids: list[str] | None = None,
) -> int:
    """Insert ``n_posts`` synthetic posts with COPY and return how many were inserted.

    Deterministic for a given ``seed`` (and arguments). ~10% of the posts are older than
    ``days`` before ``end``; ``bad_fraction`` of them are bad rows of the kinds in ``BAD_KINDS``.

    :param end: the window's end (timezone-aware); posts fall before it, never after.
    :param model_ids: the models/arms that generated the posts, assigned round robin
        (default: the single baseline ``gpt-3.5-turbo-0125``).
    """
    if n_posts < 0:
        raise ValueError(f"n_posts must be >= 0, got {n_posts}")
    if end.tzinfo is None or end.utcoffset() is None:
        raise ValueError(f"end must be timezone-aware, got naive {end.isoformat()}")
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    if personas < 1:
        raise ValueError(f"personas must be >= 1, got {personas}")
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1], got {bad_fraction}")
    ids = list(model_ids) if model_ids is not None else [BASELINE_MODEL_ID]
    if not ids:
        raise ValueError("model_ids must name at least one model, got an empty list")

    rows = _rows(
        n_posts, end=end, days=days, personas=personas, seed=seed, bad_fraction=bad_fraction, model_ids=ids
    )
    with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY_SQL) as copy:
        for row in rows:
            copy.write_row(row)
    return n_posts
