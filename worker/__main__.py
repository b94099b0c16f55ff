"""``python -m worker [--device cuda] [--name NAME]``: one worker process (settings from the
environment: REDIS_URL, INFLUENCE_*)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from models.training import resolve_device
from worker.main import DeviceFailure, run_worker
from worker.settings import load_settings

CONFIG_ERROR = 2
"""Exit status of a worker that cannot start as configured (like argparse's usage errors):
``influence-service serve`` does not restart such a worker."""

DEVICE_FAILURE_EXIT = 3
"""Exit status of a worker whose device failed (``worker.main.DeviceFailure``): restart it."""


def main(argv: list[str] | None = None, prog: str = "python -m worker") -> None:
    """Run one worker; ``prog`` names the command in usage and error messages."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--device", help="torch device (default: INFLUENCE_DEVICE or cpu)")
    parser.add_argument("--name", help="consumer name (default: host-pid-random)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
    except ValueError as exc:
        parser.exit(CONFIG_ERROR, f"{parser.prog}: error: {exc}\n")
    if not settings.redis_url:
        parser.error("REDIS_URL is not set: point it at the service's Redis")
    device = args.device or settings.device
    try:
        resolve_device(device, "--device" if args.device else "INFLUENCE_DEVICE", ValueError)
    except ValueError as exc:  # before connecting: a worker that cannot compute claims nothing
        parser.exit(CONFIG_ERROR, f"{parser.prog}: error: {exc}\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_worker(settings, device=device, stop=stop, name=args.name)
    except DeviceFailure as exc:
        logging.getLogger("worker").error("device failed (%s); exiting for a restart", exc)
        raise SystemExit(DEVICE_FAILURE_EXIT) from None


if __name__ == "__main__":
    main()
