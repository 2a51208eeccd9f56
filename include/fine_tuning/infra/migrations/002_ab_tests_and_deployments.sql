-- A/B tests and deployments: the pipeline's own tables. The live routing the agent reads is in
-- Redis; these rows are the record (who, when, why) and survive a Redis flush.

-- Whether generating the post failed (the error-rate guardrail and rollback trigger). Adding a
-- column with a constant default is a catalog-only change since PostgreSQL 11: instant.
ALTER TABLE posts ADD COLUMN IF NOT EXISTS is_error boolean NOT NULL DEFAULT false;

-- The A/B aggregates filter posts by arm (model_id) and time: posts_model_ts_idx serves both,
-- created CONCURRENTLY by 003_posts_indexes.sql (the agent writes to posts all the time).

CREATE TABLE IF NOT EXISTS ab_tests (
    id text PRIMARY KEY,
    model_type text NOT NULL,
    baseline_model text NOT NULL,
    candidate_model text NOT NULL,
    candidate_version text,
    traffic_split double precision NOT NULL CHECK (traffic_split > 0 AND traffic_split < 1),
    started_at timestamptz NOT NULL,
    planned_end_at timestamptz NOT NULL,
    ended_at timestamptz,
    status text NOT NULL CHECK (status IN ('running', 'promote', 'reject', 'aborted')),
    success_criteria jsonb NOT NULL,
    power_plan jsonb NOT NULL,
    -- the always-valid p-value is the running minimum over every look so far
    min_sequential_p double precision NOT NULL DEFAULT 1.0,
    looks integer NOT NULL DEFAULT 0,
    last_analysis jsonb,
    dag_id text,
    run_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (dag_id, run_id)
);

CREATE TABLE IF NOT EXISTS deployments (
    id text PRIMARY KEY,
    ab_test_id text REFERENCES ab_tests (id),
    model_type text NOT NULL,
    candidate_model text NOT NULL,
    previous_model text NOT NULL,
    candidate_version text,
    strategy text NOT NULL CHECK (strategy IN ('gradual_rollout', 'immediate')),
    rollout_config jsonb NOT NULL,
    rollback_triggers jsonb NOT NULL,
    current_traffic double precision NOT NULL,
    status text NOT NULL CHECK (status IN ('rolling_out', 'completed', 'rolled_back')),
    started_at timestamptz NOT NULL,
    last_step_at timestamptz NOT NULL,
    finished_at timestamptz,
    rollback_reason text,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- One live rollout per model type: two would fight over the routing.
CREATE UNIQUE INDEX IF NOT EXISTS deployments_one_active_idx
    ON deployments (model_type) WHERE status = 'rolling_out';

CREATE TABLE IF NOT EXISTS deployment_events (
    id bigserial PRIMARY KEY,
    deployment_id text NOT NULL REFERENCES deployments (id),
    at timestamptz NOT NULL DEFAULT now(),
    kind text NOT NULL CHECK (kind IN ('started', 'advanced', 'held', 'completed', 'rolled_back')),
    traffic double precision NOT NULL,
    detail jsonb NOT NULL DEFAULT '{}'
);
