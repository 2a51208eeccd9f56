"""``python -m fine_tuning STEP``: the CLI a step pod runs (and anyone can run by hand).

Examples::

    python -m fine_tuning collect --dag-id weekly_fine_tuning --run-id manual_1 \\
        --window-end 2026-11-22T02:00:00+00:00 --params '{"engagement_threshold": 0.07}'
    python -m fine_tuning upload ... --input collect=@/tmp/fine_tuning/.../collect.json
    python -m fine_tuning migrate
    python -m fine_tuning seed --posts 5000
    python -m fine_tuning settings airflow_settings.yaml   # connections, variables, pools

A step prints its manifest as JSON on stdout and, with ``--xcom-file`` (the
KubernetesPodOperator's ``/airflow/xcom/return.json``), writes it there too. Exit codes: 0 done,
99 skipped (too little data: the task is marked skipped), 2 bad input or configuration, 3 refused
(over the cost limit, a provider closed to new jobs), 1 failed (a retry may fix it). The task
fails at once on 2 and 3 (``fine_tuning.step_graph.FAIL_FAST_EXIT_CODES``). When
``FINE_TUNING_TERMINATION_LOG`` names a file (the pod's ``/dev/termination-log``), the reason of a
non-zero exit is written there too, so the task's error says why the pod failed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from fine_tuning import clock
from fine_tuning.cli.analyze import main as analyze_main
from fine_tuning.config import ConfigError, PipelineConfig, load_config
from fine_tuning.deploy import rollout
from fine_tuning.evaluate.ab import CandidateSuperseded, RoutingOwned
from fine_tuning.infra import db
from fine_tuning.infra.redis import redis_client
from fine_tuning.manifests import RunContext
from fine_tuning.pipeline import (
    STEPS,
    CandidateRejected,
    InsufficientDataError,
    deployment_manifest,
    exit_code_for,
    run_step,
)
from fine_tuning.pipeline import health as pipeline_health
from fine_tuning.step_graph import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_SKIPPED, EXIT_WAITING

TERMINATION_LOG_ENV = "FINE_TUNING_TERMINATION_LOG"


def _fail(code: int, message: str) -> int:
    """Say why on stderr and, in a pod, in its termination message (Kubernetes keeps 4 KiB)."""
    print(f"error: {message}", file=sys.stderr)
    path = os.environ.get(TERMINATION_LOG_ENV)
    if path:
        try:
            Path(path).write_text(f"exit {code}: {message}"[:4096])
        except OSError as exc:  # the message is a courtesy; the exit code is the contract
            logging.getLogger("fine_tuning").warning("cannot write %s: %s", path, exc)
    return code


def _parse_input(raw: str) -> tuple[str, str]:
    name, sep, value = raw.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--input {raw!r}: expected NAME=JSON or NAME=@FILE")
    if value.startswith("@"):
        value = Path(value[1:]).read_text()
    return name, value


def _parse_datetime(raw: str) -> datetime:
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window-end {raw!r} is not an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fine_tuning", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in STEPS:
        step = sub.add_parser(name, help=STEPS[name].__doc__)
        step.add_argument("--dag-id", required=True)
        step.add_argument("--run-id", required=True)
        step.add_argument("--window-end", type=_parse_datetime, required=True)
        step.add_argument("--config-file", help="training_config.json (default $FINE_TUNING_CONFIG_FILE)")
        step.add_argument("--params", default="{}", help="DAG run params as a JSON object")
        step.add_argument("--input", action="append", type=_parse_input, default=[])
        step.add_argument("--xcom-file", type=Path, help="also write the manifest here")
    analyze = sub.add_parser("analyze", help="A/B statistics on per-arm aggregates (JSON in, JSON out)")
    analyze.add_argument("--method", choices=("fixed", "sequential"), default="sequential")
    analyze.add_argument("file", nargs="?", type=argparse.FileType("r"), default=sys.stdin)
    rollback = sub.add_parser("rollback", help="roll a deployment back to the previous model, with a reason")
    rollback.add_argument("--deployment-id", required=True)
    rollback.add_argument("--reason", required=True)
    health = sub.add_parser(
        "health", help="probe the dependencies; print the /health JSON; exit 0 healthy, 1 not"
    )
    health.add_argument("--config-file", help="training_config.json (default $FINE_TUNING_CONFIG_FILE)")
    settings = sub.add_parser(
        "settings",
        help="load airflow_settings.yaml (Astro CLI format) into the local Airflow's connections, "
        "variables, pools",
    )
    settings.add_argument("file", nargs="?", default="airflow_settings.yaml")
    sub.add_parser("migrate", help="apply the database migrations")
    seed = sub.add_parser("seed", help="insert synthetic posts (development and demo)")
    seed.add_argument("--posts", type=int, default=5000)
    seed.add_argument("--days", type=int, default=7)
    seed.add_argument("--end", type=_parse_datetime, default=None)
    return parser


def health(config: PipelineConfig) -> int:
    """``health``: print the report as JSON, send its gauges, exit 0 healthy / 1 not."""
    report = pipeline_health(config, emit_metrics=True)
    print(json.dumps(report.model_dump(mode="json"), indent=2))
    return 0 if report.healthy else 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "analyze":  # offline: needs no configuration or services
        return analyze_main(args.method, args.file)
    if args.command == "settings":  # writes to Airflow's metadata database, not the pipeline's
        # dev/ is a development tool, left out of the Airflow image: imported only when asked for.
        from fine_tuning.dev.airflow_settings import SettingsError, load_settings

        try:
            print(json.dumps(load_settings(args.file)))
        except SettingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        return 0

    try:
        params = json.loads(args.params) if hasattr(args, "params") else {}
        if not isinstance(params, dict):
            raise ConfigError(f"--params must be a JSON object, got {args.params!r}")
        config = load_config(getattr(args, "config_file", None), params=params)
    except (ConfigError, json.JSONDecodeError) as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))

    if args.command == "rollback":
        try:
            record = rollout.rollback(
                config, redis_client(config), args.deployment_id, args.reason, clock.now_utc()
            )
        except (rollout.UnknownDeployment, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(deployment_manifest(record).to_json())
        return 0

    if args.command == "health":
        return health(config)

    if args.command in ("migrate", "seed"):
        with db.connect(config.services.database_url.get_secret_value()) as conn:
            db.migrate(conn)
            if args.command == "seed":
                from fine_tuning.dev.seed import seed_posts  # development only (not in the image)

                count = seed_posts(conn, args.posts, end=args.end or datetime.now(UTC), days=args.days)
                print(json.dumps({"posts_inserted": count}))
        return 0

    ctx = RunContext(dag_id=args.dag_id, run_id=args.run_id, window_end=args.window_end)
    try:
        manifest = run_step(args.command, config, ctx, dict(args.input))
    except (InsufficientDataError, CandidateRejected, CandidateSuperseded) as exc:
        logging.getLogger("fine_tuning").warning("skipping the rest of the run: %s", exc)
        return EXIT_SKIPPED
    except RoutingOwned as exc:  # the pod operator defers and runs the step again
        return _fail(EXIT_WAITING, f"{args.command}: {exc}")
    except Exception as exc:
        code = exit_code_for(exc)
        if code == EXIT_FAILED:  # unexpected: the traceback goes to the pod's log
            logging.getLogger("fine_tuning").exception("%s failed", args.command)
        return _fail(code, f"{args.command}: {type(exc).__name__}: {exc}")
    text = manifest.to_json()
    if args.xcom_file:
        args.xcom_file.parent.mkdir(parents=True, exist_ok=True)
        args.xcom_file.write_text(text)
    print(text)
    return 0
