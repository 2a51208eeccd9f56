"""Stage 5, deploy: the gradual rollout of a promoted candidate, its health gates and rollback."""
