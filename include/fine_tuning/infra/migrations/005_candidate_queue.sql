-- The candidates waiting for the routing (one owner per model type, fine_tuning.evaluate.ab):
-- a weekly run's candidate joins at its first ab_create attempt as 'waiting', and leaves as
-- 'started' (its A/B test began) or 'superseded' (a candidate trained on newer data came while
-- it waited: it never gets traffic, and the row says which one replaced it).
CREATE TABLE IF NOT EXISTS candidate_queue (
    candidate_model text PRIMARY KEY,
    model_type text NOT NULL,
    candidate_version text,
    dag_id text NOT NULL,
    run_id text NOT NULL,
    -- the end of the week of posts it was trained on: what "newer" means
    data_end timestamptz NOT NULL,
    queued_at timestamptz NOT NULL,
    status text NOT NULL CHECK (status IN ('waiting', 'started', 'superseded')),
    superseded_by text,
    ab_test_id text REFERENCES ab_tests (id),
    decided_at timestamptz,
    UNIQUE (dag_id, run_id)
);

CREATE INDEX IF NOT EXISTS candidate_queue_waiting_idx
    ON candidate_queue (model_type, data_end) WHERE status = 'waiting';
