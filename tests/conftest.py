"""Test-session settings: torch computes on one thread in the test process.

On a 2-core machine that is busy (CI beside other work, a simulation beside the tests), torch's
default of one thread per core makes every small op wait for a thread that is not scheduled: an
in-process federation measured 180 s with 2 threads under load and 22 s with 1. The processes
that tests start (Flower's SuperLink, ServerApp and Ray actors) keep their own settings.
"""

import pytest
import torch

from common.config import ExperimentConfig

torch.set_num_threads(1)


@pytest.fixture
def config(tmp_path):
    """A small synthetic Fed-QSSL run of three clients (4, 8, 4 bits), one round."""
    return ExperimentConfig.from_mapping(
        {
            "dataset": "synthetic",
            "num-clients": 3,
            "bitwidths": "4,8,4",
            "num-rounds": 1,
            "dirichlet-beta": 1.0,
            "buffer-ratio": 0.1,
            "batch-size": 32,
            "min-fit-clients": 1,  # the failure tests keep one good client of several
            "output-dir": str(tmp_path / "out"),
        }
    )
