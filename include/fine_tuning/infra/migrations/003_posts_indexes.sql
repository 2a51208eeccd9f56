-- fine_tuning: no-transaction
-- The indexes on the agent's posts table. CREATE INDEX CONCURRENTLY does not block the agent's
-- inserts while it builds (a plain CREATE INDEX takes a SHARE lock for the whole build), and it
-- cannot run inside a transaction block: the first line marks this file for the migrator,
-- which runs each statement on its own, in autocommit, under a session-level advisory lock,
-- and refuses to record the migration while an index it left is INVALID (an interrupted build).
-- One statement per `;`, no `;` inside a statement.

-- Collection's window filter and the A/B aggregates over a time range (001 says why (ts)).
CREATE INDEX CONCURRENTLY IF NOT EXISTS posts_ts_idx ON posts (ts);

-- The A/B aggregates filter by arm (model_id) and time.
CREATE INDEX CONCURRENTLY IF NOT EXISTS posts_model_ts_idx ON posts (model_id, ts);
