"""What influence scores mean, in the words every job result and API answer carries.

Kept free of torch so the HTTP client and CLI can import the response models cheaply.
"""

from __future__ import annotations

__all__ = ["SCORE_MEANING", "SELF_INFLUENCE_MEANING"]

SCORE_MEANING = (
    "score[q, i] = (1/N) grad L_q^T (G + damping I)^-1 grad L_i: predicted change of test "
    "loss q when training point i is removed. Positive = helpful (removing it raises the "
    "loss), negative = harmful. N = training-set size."
)
SELF_INFLUENCE_MEANING = (
    "self-influence (1/N) grad L_i^T (G + damping I)^-1 grad L_i; large = unusual or "
    "mislabelled training point."
)
