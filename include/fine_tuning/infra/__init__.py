"""Shared infrastructure that knows no pipeline stage: PostgreSQL and its migrations, Redis,
circuit breakers, the metrics cache, StatsD metrics and the health report."""
