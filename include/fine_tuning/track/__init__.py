"""Stage 3, track: the MLflow run and registered model version of a candidate (``registry``),
and the durable outbox that replays tracking calls made while MLflow was down (``outbox``)."""
