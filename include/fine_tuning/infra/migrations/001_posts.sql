-- The content agent's posts. In production the table already exists (the agent owns it), so
-- every statement is IF NOT EXISTS: this migration only fills in what the pipeline needs.
CREATE TABLE IF NOT EXISTS posts (
    id bigserial PRIMARY KEY,
    persona_id text NOT NULL,
    hook text,
    body text,
    engagement_rate double precision NULL,
    ts timestamptz NOT NULL DEFAULT now(),
    tokens_used integer,
    model_id text NULL,
    response_time_ms double precision NULL,
    quality_score double precision NULL,
    cost_usd double precision NULL
);

-- Columns the pipeline reads that an older posts table may lack (the A/B test groups by
-- model_id). Adding a nullable column without a default is a catalog-only change: instant.
ALTER TABLE posts ADD COLUMN IF NOT EXISTS model_id text NULL;
ALTER TABLE posts ADD COLUMN IF NOT EXISTS response_time_ms double precision NULL;
ALTER TABLE posts ADD COLUMN IF NOT EXISTS quality_score double precision NULL;
ALTER TABLE posts ADD COLUMN IF NOT EXISTS cost_usd double precision NULL;

-- Serves collection's window filter (ts >= start AND ts < end) and the A/B aggregates over a
-- time range. Chosen by measurement (EXPLAIN ANALYZE through a cursor, 100k posts, PG 15):
--   * 52 weeks of history, 7-day window (~2% of rows, the production shape):
--     no index: Seq Scan + top-N sort, 27 ms; (ts): Index Scan + sort, 3 ms;
--     (ts, engagement_rate): 3 ms, the same plan — the second column buys nothing, because the
--     filter is on COALESCE(engagement_rate, 0) (not an index condition) and the ORDER BY spans
--     the whole window, so a sort follows either way; it only makes the index larger.
--     (engagement_rate DESC NULLS LAST): with a cursor's default cursor_tuple_fraction (0.1)
--     the planner walks it in order and filters ts, 81 ms: worse than no index.
--   * one week of posts only (the demo, ~90% of rows in the window): the planner rightly
--     ignores every candidate and seq-scans (100-180 ms); no index changes that much.
-- So: (ts), created by 003_posts_indexes.sql CONCURRENTLY, outside a transaction: a plain
-- CREATE INDEX here, inside the migration's transaction, would block the agent's inserts for
-- as long as the build takes. (Until 2026-12 it was created here; a database migrated then
-- has it already and 003 does nothing.)
