"""``python -m worker [--device cuda] [--name NAME]``: one worker process (settings from the
environment: REDIS_URL, INFLUENCE_*)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from worker.main import run_worker
from worker.settings import Settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--device", help="torch device (default: INFLUENCE_DEVICE or cpu)")
    parser.add_argument("--name", help="consumer name (default: host-pid-random)")
    args = parser.parse_args(argv)
    settings = Settings()
    if not settings.redis_url:
        parser.error("REDIS_URL is not set: point it at the service's Redis")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_worker(settings, device=args.device, stop=stop, name=args.name)


if __name__ == "__main__":
    main()
