"""Does longer training remove digits_mlp64's high-leverage removed point?

Trains the config's network for K = 40 (the config), 200 and 1,000 epochs (the paper's
K), everything else unchanged, and prints the removal leverage ρ_z
(``Responder.removal_leverage``) of the correlation's 20 sampled points: the largest, its
training index, and the largest of the other 19. Run from the repository root (about a
minute):

    .venv/bin/python docs/experiments/checks/digits_leverage_vs_epochs.py
"""

import json
from pathlib import Path

import torch

from influence.experiments.config import ExperimentConfig
from influence.response import Responder

torch.set_num_threads(2)
data = json.loads((Path(__file__).parents[3] / "influence/configs/digits_mlp64.json").read_text())
for epochs in (40, 200, 1000):
    data["recipe"]["epochs"] = epochs
    config = ExperimentConfig.from_dict(data)
    train_set, _ = config.datasets()
    responder = Responder.from_run(config.train_base(train_set), train_set, config.response)
    gen = torch.Generator().manual_seed(config.correlation.seed)  # the draw of correlate()
    removed = torch.randperm(responder.n, generator=gen)[: config.correlation.num_points]
    rho = responder.removal_leverage([[int(i)] for i in removed])
    top = int(rho.argmax())
    others = torch.cat([rho[:top], rho[top + 1 :]])
    print(
        f"K = {epochs:4d}: largest ρ = {float(rho[top]):.3f} (train index {int(removed[top])}), "
        f"largest of the other 19 = {float(others.max()):.3f}, mean = {float(rho.mean()):.3f}"
    )
