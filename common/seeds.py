"""Every seed a run derives from its config's ``seed``, in one place.

A run is reproducible, and resumable, because every random draw of a round is a function of the
config's seed and the round number (and the client), never of a generator carried from one round
to the next. (The client caps and the probe sample share NumPy's ``[seed, k]`` form: client 1's
cap and the probe sample draw from the same stream, from different index sets; kept as it is so
that committed results reproduce.)
"""

from __future__ import annotations

import numpy as np

PROBE_SAMPLE_STREAM = 1
CLIENT_SAMPLING_STREAM = 3


def partition_rng(seed: int) -> np.random.Generator:
    """The Dirichlet split of the training pool and the server buffer D_g."""
    return np.random.default_rng(seed)


def client_cap_rng(seed: int, client: int) -> np.random.Generator:
    """Which of a client's images it keeps under ``max-samples-per-client``."""
    return np.random.default_rng([seed, client])


def probe_sample_rng(seed: int) -> np.random.Generator:
    """The global probe's class-stratified labelled images."""
    return np.random.default_rng([seed, PROBE_SAMPLE_STREAM])


def client_sampling_rng(seed: int, server_round: int) -> np.random.Generator:
    """Which partitions a round samples at ``fraction-fit`` < 1."""
    return np.random.default_rng([seed, server_round, CLIENT_SAMPLING_STREAM])


def client_round_seed(seed: int, server_round: int, partition: int) -> int:
    """A client's training in a round: its batches, augmentations, gradient rounding."""
    return seed * 7919 + server_round * 101 + partition


def server_round_seed(seed: int, server_round: int) -> int:
    """The server's de-quantization in a round: D_g's views and the fine-tunes' rounding."""
    return seed * 1_000_003 + server_round * 1_000_000


def requantize_seed(seed: int, server_round: int, bits: int) -> int:
    """The server's re-quantization for one bitwidth in a round."""
    return server_round_seed(seed, server_round) + 500_000 + bits
