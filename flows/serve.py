"""Serve the end-to-end flow as a scheduled deployment (`make serve`): this process polls the Prefect API
($PREFECT_API_URL, or the local server it starts) and runs the deployment's flow runs in the workspace.

The schedule survives restarts (`pause_on_shutdown=False`); stop with Ctrl-C / SIGTERM. prefect.yaml defines the
same deployment for a work pool, for a Prefect server with workers (`prefect deploy --name nightly`).

    python flows/serve.py [--name nightly] [--cron "0 2 * * *"] [--workspace .]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `flows` importable when run as a script

from effnet.errors import EffnetError  # noqa: E402
from flows.pipeline import check_prefect_api, pipeline, start_api  # noqa: E402

DEFAULT_NAME = "nightly"
DEFAULT_CRON = "0 2 * * *"  # 02:00 every day, in the server's timezone (UTC unless set)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python flows/serve.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--name", default=os.environ.get("EFFNET_DEPLOYMENT", DEFAULT_NAME),
                    help=f"the deployment's name (default: $EFFNET_DEPLOYMENT, else {DEFAULT_NAME})")
    ap.add_argument("--cron", default=os.environ.get("EFFNET_CRON", DEFAULT_CRON),
                    help=f"its schedule (default: $EFFNET_CRON, else '{DEFAULT_CRON}')")
    ap.add_argument("--workspace", default=".", help="the DVC workspace the flow runs in (default: cwd)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        check_prefect_api()
    except EffnetError as e:
        sys.exit(f"effnet: error: {e}")
    start_api()
    pipeline.serve(name=args.name, cron=args.cron, pause_on_shutdown=False,
                   parameters={"workspace": str(Path(args.workspace).resolve())},
                   tags=["effnet"], description="shard, train, FixRes, evaluate and register every variant")


if __name__ == "__main__":
    main()
