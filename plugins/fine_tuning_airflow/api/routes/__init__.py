"""One ``APIRouter`` per resource: pipelines (runs of the DAG), evaluation (A/B tests),
deployments (rollouts), monitoring (health, metrics)."""
