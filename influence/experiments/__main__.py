"""``python -m influence.experiments {decomposition,correlation,mislabel,sweep}
--config FILE.json --out DIR [--device cuda]``: JSON result, Markdown table and figures
in DIR."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from tqdm import tqdm

from influence.errors import SolverError
from influence.experiments.config import ExperimentConfig
from influence.experiments.correlation import correlate
from influence.experiments.mislabel import detect_mislabels
from influence.experiments.plots import (
    plot_correlation,
    plot_decomposition,
    plot_mislabel,
    plot_sweep,
)
from influence.experiments.sweep import BASE_SHARE, run_decomposition, sweep
from influence.response import Responder
from influence.solvers import phase_progress
from models import Progress
from models.training import resolve_device

COMMANDS = ("decomposition", "correlation", "mislabel", "sweep")
PROG = "python -m influence.experiments"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def run(
    command: str, config: ExperimentConfig, out: Path, progress: Progress, command_line: str
) -> dict:
    """Run one experiment and write ``<command>.json``, ``<command>.md`` and figures.

    Old ``<command>.*`` outputs in ``out`` are deleted first and the new ones are written
    to a staging folder, then renamed into place (the JSON last), so a failed or
    interrupted run leaves no stale or partial result. The JSON also records the config
    (every field, defaults included) and ``command_line``."""
    for old in out.glob(f"{command}.*"):
        if old.is_file():
            old.unlink()
    stage = out / f".{command}.partial"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        title = f"{config.name}: {command}"
        if command == "decomposition":
            result = run_decomposition(config, progress)
            plot_decomposition(result, stage / command, title)
        elif command == "correlation":
            train_set, test_set = config.datasets()
            training = phase_progress(progress, 0.0, BASE_SHARE, "train")
            run_ = config.train_base(train_set, training)
            responder = Responder.from_run(run_, train_set, config.response)
            scoring = phase_progress(progress, BASE_SHARE, 1.0)
            result = correlate(responder, test_set, config.correlation, scoring)
            plot_correlation(result, stage / command, title)
        elif command == "mislabel":
            result = detect_mislabels(config, progress)
            plot_mislabel(result, stage / command, title)
        else:
            result = sweep(config, progress)
            plot_sweep(result, stage / command, title)
        data = _json_safe(result.to_dict())
        record = {**data, "config": _json_safe(config.to_dict()), "command_line": command_line}
        (stage / f"{command}.md").write_text(result.markdown(title))
        (stage / f"{command}.json").write_text(json.dumps(record, indent=1))
        for path in sorted(stage.iterdir(), key=lambda path: path.suffix == ".json"):
            path.replace(out / path.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return data


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: parse ``argv``, run the experiment with a progress bar, print
    its Markdown table; returns 0. A mistake in the arguments or the config (found before
    any training) or an error of the run prints one line and exits with status 2 (as
    argparse does), an interrupt with 130."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
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
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)

    def fail(message: str) -> NoReturn:
        parser.exit(2, f"{PROG}: error: {message}\n")

    if args.threads < 1:
        fail(f"--threads must be >= 1, got {args.threads}")
    try:
        if args.device is not None:
            resolve_device(args.device, "--device", ValueError)
        config = ExperimentConfig.load(args.config, device=args.device)
        config.check(args.command)
    except ValueError as exc:
        fail(str(exc))
    if args.out.exists() and not args.out.is_dir():
        fail(f"--out {str(args.out)!r} exists and is not a directory")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create --out {str(args.out)!r}: {exc}")
    torch.set_num_threads(args.threads)
    command_line = shlex.join([*PROG.split(), *argv])
    try:
        with tqdm(total=100, desc=args.command, unit="%") as bar:

            def progress(fraction: float, phase: str) -> None:
                if bar.postfix != phase:
                    bar.set_postfix_str(phase, refresh=False)
                bar.update(round(100 * fraction) - bar.n)

            run(args.command, config, args.out, progress, command_line)
    except KeyboardInterrupt:
        parser.exit(130, "interrupted; no results written\n")
    except (ValueError, OSError, SolverError) as exc:
        # ValueError covers models' ConfigError, DatasetError, TrainingError, TargetError.
        fail(str(exc))
    print((args.out / f"{args.command}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
