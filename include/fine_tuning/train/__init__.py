"""Stage 2, train: a fine-tuning job with the configured provider (``providers``: OpenAI, Azure
OpenAI, self-hosted LoRA), behind one interface, idempotent on retries."""
