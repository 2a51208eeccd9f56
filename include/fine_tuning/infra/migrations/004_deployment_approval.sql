-- A rollout may wait for a person before its last step (deployment.require_approval): the
-- status 'awaiting_approval' and the events of the request and its answer. The constraints are
-- 002's column CHECKs (PostgreSQL names them <table>_<column>_check); the table is small, so the
-- index is rebuilt in this transaction, and no other rollout can start in between.

ALTER TABLE deployments DROP CONSTRAINT IF EXISTS deployments_status_check;
ALTER TABLE deployments ADD CONSTRAINT deployments_status_check
    CHECK (status IN ('rolling_out', 'awaiting_approval', 'completed', 'rolled_back'));

ALTER TABLE deployment_events DROP CONSTRAINT IF EXISTS deployment_events_kind_check;
ALTER TABLE deployment_events ADD CONSTRAINT deployment_events_kind_check
    CHECK (kind IN ('started', 'advanced', 'held', 'awaiting_approval', 'approved', 'rejected',
                    'completed', 'rolled_back'));

-- A rollout awaiting approval still owns the routing (it serves its traffic share).
DROP INDEX IF EXISTS deployments_one_active_idx;
CREATE UNIQUE INDEX deployments_one_active_idx
    ON deployments (model_type) WHERE status IN ('rolling_out', 'awaiting_approval');
