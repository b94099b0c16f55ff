"""``python -m influence.experiments {decomposition,correlation,mislabel,sweep}
--config FILE.json --out DIR [--device cuda]``: JSON result, Markdown table and figures
in DIR."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from influence.experiments.config import ExperimentConfig
from influence.experiments.correlation import correlate
from influence.experiments.mislabel import detect_mislabels
from influence.experiments.plots import (
    plot_correlation,
    plot_decomposition,
    plot_mislabel,
    plot_sweep,
)
from influence.experiments.sweep import run_decomposition, sweep
from influence.response import Responder
from models import Progress
from models.training import resolve_device

COMMANDS = ("decomposition", "correlation", "mislabel", "sweep")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def run(command: str, config: ExperimentConfig, out: Path, progress: Progress) -> dict:
    """Run one experiment and write ``<command>.json``, ``<command>.md`` and figures."""
    title = f"{config.name}: {command}"
    if command == "decomposition":
        result = run_decomposition(config, progress)
        plot_decomposition(result, out / command, title)
    elif command == "correlation":
        train_set, test_set = config.datasets()
        responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
        result = correlate(responder, test_set, config.correlation, progress)
        plot_correlation(result, out / command, title)
    elif command == "mislabel":
        result = detect_mislabels(config, progress)
        plot_mislabel(result, out / command, title)
    else:
        result = sweep(config, progress)
        plot_sweep(result, out / command, title)
    data = _json_safe(result.to_dict())
    (out / f"{command}.json").write_text(json.dumps(data, indent=1))
    (out / f"{command}.md").write_text(result.markdown(title))
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse ``argv``, run the experiment with a progress bar, print
    its Markdown table; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m influence.experiments", description=__doc__)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--config", required=True, type=Path, help="experiment JSON config")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument(
        "--device",
        help="torch device of the base training, the responses and the influence solves: "
        "'cpu', 'cuda' or 'cuda:N' (default: the config's response.device, itself 'cpu' "
        "by default); overrides response.device",
    )
    args = parser.parse_args(argv)
    try:
        if args.device is not None:
            resolve_device(args.device, "--device", ValueError)
        config = ExperimentConfig.load(args.config, device=args.device)
    except ValueError as exc:
        parser.error(str(exc))
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=100, desc=args.command, unit="%") as bar:

        def progress(fraction: float, phase: str) -> None:
            if bar.postfix != phase:
                bar.set_postfix_str(phase, refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        run(args.command, config, args.out, progress)
    print((args.out / f"{args.command}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
