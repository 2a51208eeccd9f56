"""Airflow side of the fine-tuning pipeline: hook, trigger and operators around the library."""
