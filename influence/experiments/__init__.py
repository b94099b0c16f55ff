"""The paper's experiments on recorded runs: decomposition, test-loss correlations,
mislabel detection and sweeps; CLI ``python -m influence.experiments``."""
