"""Development tools, not part of the product and left out of the Airflow image: the demo, the
local stack (PostgreSQL, Redis, MLflow, the emulator), ``make serve``, synthetic posts, the
traffic simulator, the ``airflow_settings.yaml`` loader and the tiny self-hosted model."""
