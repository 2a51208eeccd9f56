"""Run the emulator: ``python -m openai_emulator --host 127.0.0.1 --port 8765 --stage-seconds 1.0``.

Point the official client at it with ``OpenAI(base_url="http://HOST:PORT/v1", api_key="sk-...")``.
Logs go to stderr.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m openai_emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (default 8765)")
    parser.add_argument(
        "--stage-seconds",
        type=float,
        default=1.0,
        help="seconds each job stage (validating_files, queued, running) lasts; 0 allowed",
    )
    parser.add_argument(
        "--api-key", default=None, help="accept only this key (default: any key starting with sk-)"
    )
    parser.add_argument("--refuse-jobs", action="store_true", help="refuse new fine-tuning jobs (403)")
    parser.add_argument(
        "--fine-tuning-closes",
        default=None,
        metavar="YYYY-MM-DD",
        help="refuse new fine-tuning jobs from this UTC day on the emulator's clock (OpenAI: 2027-01-06)",
    )
    parser.add_argument(
        "--model-owner",
        default="emulator",
        help="the owner segment of fine-tuned model ids (ft:BASE:OWNER:...)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and serve until interrupted."""
    args = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    import uvicorn

    from openai_emulator.app import create_app
    from openai_emulator.settings import Settings

    closes = None
    if args.fine_tuning_closes:
        from datetime import UTC, datetime

        closes = datetime.fromisoformat(args.fine_tuning_closes).replace(tzinfo=UTC).timestamp()
    settings = Settings(
        stage_seconds=args.stage_seconds,
        api_key=args.api_key,
        refuse_jobs=args.refuse_jobs,
        fine_tuning_closes_at=closes,
        model_owner=args.model_owner,
    )
    logging.getLogger("openai_emulator").info(
        "OpenAI emulator on http://%s:%d/v1 (stage %.3g s, admin at /_emulator)",
        args.host,
        args.port,
        args.stage_seconds,
    )
    # uvicorn writes its access log to stdout by default: send every log line to stderr.
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    for handler in log_config["handlers"].values():
        handler["stream"] = "ext://sys.stderr"
    uvicorn.run(
        create_app(settings), host=args.host, port=args.port, log_level=args.log_level, log_config=log_config
    )


if __name__ == "__main__":
    main()
