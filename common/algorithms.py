"""The federated algorithms this project runs, as data: objective, server step, uplink.

One client and one strategy run every algorithm; what differs is looked up here, so adding a
baseline is one entry, not another training loop.

- ``fedqssl``: SimCLR locally; server de-quantizes on D_g, weights by softmax(-L_DQ), aggregates
  and re-quantizes by fine-tuning at each bitwidth (the paper's method).
- ``fedsimclr`` / ``fedsimsiam``: SimCLR / SimSiam locally, sample-weighted averaging,
  re-quantization by rounding only.
- ``fedsimclr-ft``: a control for Fed-QSSL's use of D_g. Fed-SimCLR whose server fine-tunes the
  sample-weighted average on D_g in full precision (``dq-epochs``, the training each of
  Fed-QSSL's de-quantized models gets) and re-quantizes it by fine-tuning at each bitwidth
  (``rq-epochs``, as Fed-QSSL): the buffer's extra training without the per-client
  de-quantization and its softmax(-L_DQ) weighting.
- ``buffer-only``: a control for what D_g alone teaches. No client trains; the server trains the
  global model with SimCLR on D_g for the optimizer steps Fed-QSSL's server takes in the same
  round (its de- and re-quantizations), and sends it rounded to each bitwidth.
- ``local-only``: the personalization control (personalized FL's "Local" row). Each client
  trains SimCLR at its bitwidth on its own data for the whole run and keeps its model: the server
  sends each client its own model back. The global score is of the average of the local models
  (never sent); the local scores are what federation must beat.
- ``fedavg`` / ``fedprox``: supervised (labels) locally, sample-weighted averaging, rounding;
  FedProx adds ``proximal-mu / 2 * ||w - w_global||^2`` to the local loss.
- ``fedpaq``: supervised; clients send their model *update*, QSGD-quantized (unbiased) at their
  bitwidth; the server adds the sample-weighted mean update to the global model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Objective = Literal["simclr", "simsiam", "supervised"]
ServerStep = Literal["fedqssl", "finetune", "buffer", "average", "update", "none"]


@dataclass(frozen=True)
class Algorithm:
    """What one algorithm does differently from the others."""

    name: str
    label: str  # as the paper's tables name it
    objective: Objective
    server_step: ServerStep
    proximal: bool = False
    local_training: bool = True  # False: clients send back what they received (buffer-only)

    @property
    def self_supervised(self) -> bool:
        """Trains without labels (SimCLR or SimSiam)."""
        return self.objective != "supervised"

    @property
    def sends_updates(self) -> bool:
        """Clients send model updates, not models (FedPAQ)."""
        return self.server_step == "update"


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("fedqssl", "Fed-QSSL", "simclr", "fedqssl"),
        Algorithm("fedsimclr", "Fed-SimCLR", "simclr", "average"),
        Algorithm("fedsimclr-ft", "Fed-SimCLR + D_g fine-tune", "simclr", "finetune"),
        Algorithm("buffer-only", "D_g only (no clients)", "simclr", "buffer", local_training=False),
        Algorithm("local-only", "Local only (no federation)", "simclr", "none"),
        Algorithm("fedsimsiam", "Fed-SimSiam", "simsiam", "average"),
        Algorithm("fedavg", "FedAvg", "supervised", "average"),
        Algorithm("fedprox", "FedProx", "supervised", "average", proximal=True),
        Algorithm("fedpaq", "FedPAQ", "supervised", "update"),
    )
}
ALGORITHM_NAMES = tuple(ALGORITHMS)
SELF_SUPERVISED = tuple(name for name, a in ALGORITHMS.items() if a.self_supervised)


def get_algorithm(name: str) -> Algorithm:
    """The row of algorithm ``name``; a ValueError naming the known ones."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHM_NAMES)}")
    return ALGORITHMS[name]
