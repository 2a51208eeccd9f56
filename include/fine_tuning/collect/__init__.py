"""Stage 1, collect: high-engagement posts from PostgreSQL into a validated chat JSONL dataset,
with exact token counts (``tokens``) for the cost guard and the context limits."""
