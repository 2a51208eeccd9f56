# One image for the Airflow components (scheduler, API server, triggerer, dag processor) and
# for the step pods (`python -m fine_tuning STEP`).
FROM apache/airflow:3.3.2-python3.11

# The base image's airflow user by number (uid 50000, gid 0): a pod with runAsNonRoot can only
# verify a numeric user (hadolint DL3066).
USER 50000:0
COPY --chown=airflow:root requirements.txt /opt/fine-tuning/requirements.txt
# Installing apache-airflow at the base image's version keeps pip from moving Airflow itself.
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /opt/fine-tuning/requirements.txt

COPY --chown=airflow:root pyproject.toml /opt/fine-tuning/
COPY --chown=airflow:root include/ /opt/fine-tuning/include/
RUN pip install --no-cache-dir --no-deps /opt/fine-tuning

COPY --chown=airflow:root dags/ /opt/airflow/dags/
COPY --chown=airflow:root plugins/ /opt/airflow/plugins/
