"""The Flower client of every algorithm: low-bit local training at the device's own bitwidth
(the paper's Algorithm 1, lines 3-8: E epochs of ``w <- Q(w - lr * g_Q)`` at s_k bits), packed
codes both ways (models, or FedPAQ's QSGD-coded updates), and after the last round the local
linear probe on the frozen encoder (line 16)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from flwr.client import NumPyClient
from flwr.common import ArrayRecord, RecordDict

from common import seeds
from common.algorithms import SELF_SUPERVISED, get_algorithm
from common.config import ConfigError, ExperimentConfig
from common.data.datasets import ImageData
from common.learning.evaluation import LOCAL_PROBE_EPOCHS, LinearProbe, train_linear_probe
from common.learning.models import extract_features
from common.learning.objectives import objective
from common.learning.training import Trained, fit_local, recipe
from common.lowbit import kernel
from common.memory import allocator_mode, peak_resident_mb, reset_peak
from common.runs.experiment import ClientData, client_data, new_model
from common.runs.saved_models import save_client_model
from common.vocabulary import FULL_PRECISION
from common.wire.payload import (
    PayloadError,
    check_plausible,
    decode_state,
    encode_state,
    encode_update,
    payload_bits,
    payload_nbytes,
)

Scalar = bool | bytes | float | int | str
LOCAL_MODEL = "local-model"


class LowBitClient(NumPyClient):
    """One device: its data, its bitwidth, its low-bit model, and the run's algorithm.

    ``data`` defaults to the device's partition of the run's dataset. ``state`` (the node's
    persistent ``context.state``) keeps a supervised client's own model between its last
    training and its evaluation.
    """

    def __init__(
        self,
        config: ExperimentConfig,
        partition_id: int,
        bits: int,
        state: RecordDict | None = None,
        data: ClientData | None = None,
        model_dir: str = "",
    ) -> None:
        self.config = config
        self.algorithm = get_algorithm(config.algorithm)
        self.partition_id = partition_id
        self.bits = bits
        self.state = RecordDict() if state is None else state
        self.model_dir = model_dir  # where this device keeps its personalized model ("": not)
        self.data = client_data(config, partition_id) if data is None else data
        self.objective = objective(self.algorithm.objective)
        if self.objective.supervised and not self.data.train.labelled:
            raise ConfigError(
                f"{config.algorithm} trains on labels, but client {partition_id}'s data has "
                "none: give it labelled data (class folders 0, 1, ...) or run a self-supervised "
                f"algorithm ({', '.join(SELF_SUPERVISED)})"
            )
        self.model = new_model(config, bits, *self._shape())
        self.ray_node = ""  # the Ray node it trains on, in a Ray simulation (set by client_fn)

    def _shape(self) -> tuple[int, int]:
        return self.data.spec.channels, self.data.spec.num_classes

    def _load(self, parameters: list[np.ndarray]) -> None:
        """Decode a downlink payload (at this device's bitwidth, or the fp32 initial model) and
        hold it to the rules the server holds every uplink to (``check_plausible``): a device
        never trains on, or scores, a model it would refuse from a peer."""
        try:
            offered = payload_bits(parameters)
            if offered not in (self.bits, FULL_PRECISION):
                raise PayloadError(f"a {offered}-bit model, this device trains at {self.bits} bits")
            state = decode_state(parameters, template=self.model.state_dict())
            check_plausible(state)
        except ValueError as error:  # PayloadError, or the codec's own checks
            raise PayloadError(
                f"client {self.partition_id} refuses the server's model: {error}"
            ) from None
        self.model.load_state_dict(state)

    def _metrics(self, **values: Scalar) -> dict[str, Scalar]:
        return {"partition-id": self.partition_id, "bitwidth": self.bits, **values}

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Who this device is: the server asks a node it does not know yet (a resumed run, a
        restarted SuperNode) before sending it its bitwidth's model."""
        return self._metrics()

    def fit(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[list[np.ndarray], int, dict[str, Scalar]]:
        """Train at this device's bitwidth from the received model; send it back as packed
        codes (FedPAQ: the update)."""
        self._load(parameters)
        received = {name: t.detach().clone() for name, t in self.model.state_dict().items()}
        server_round = config.get("server-round", 0)
        if not isinstance(server_round, int) or isinstance(server_round, bool) or server_round < 0:
            raise PayloadError(
                f"client {self.partition_id} refuses the fit config: server-round must be an "
                f"int >= 0, got {server_round!r}"
            )
        seed = seeds.client_round_seed(self.config.seed, server_round, self.partition_id)
        on_gpu = next(self.model.parameters()).is_cuda
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        reset_peak()  # the round's peak resident memory, not the process's history
        start = time.perf_counter()
        trained_steps = Trained([], 0)  # buffer-only: the server trains, the device does not
        if self.algorithm.local_training:
            trained_steps = fit_local(
                self.model,
                self.data.train.images,
                self.objective.augmentation(self.data.spec, self.config.augmentation),
                recipe(self.config, self.bits, proximal=self.algorithm.proximal),
                seed,
                labels=self.objective.training_labels(self.data.train),
            )
        trained = self.model.state_dict()
        model_payload = encode_state(trained, self.bits)
        if self.objective.supervised:  # scored later by this very model
            self.state[LOCAL_MODEL] = ArrayRecord(numpy_ndarrays=model_payload)
        payload = model_payload
        if self.algorithm.sends_updates:
            update = {
                name: tensor - received[name] if tensor.is_floating_point() else tensor
                for name, tensor in trained.items()
            }
            payload = encode_update(
                update, self.bits, torch.Generator().manual_seed(seed), self.config.qsgd_bucket
            )
        return (
            payload,
            len(self.data.train),
            self._metrics(
                **({"loss": trained_steps.last_loss} if trained_steps.steps else {}),
                **{
                    "train-steps": trained_steps.steps,
                    "payload-bytes": payload_nbytes(payload),
                    "train-seconds": time.perf_counter() - start,
                    "torch-threads": torch.get_num_threads(),
                    **({"peak-rss-mb": peak} if (peak := peak_resident_mb()) is not None else {}),
                    "allocator": allocator_mode(),
                    "device": next(self.model.parameters()).device.type,
                    **({"fused-kernels": used} if (used := kernel.loaded()) is not None else {}),
                    **({"ray-node": self.ray_node} if self.ray_node else {}),
                    **(
                        {"gpu-peak-mb": torch.cuda.max_memory_allocated() / 2**20} if on_gpu else {}
                    ),
                },
            ),
        )

    def evaluate(
        self, parameters: list[np.ndarray], config: dict[str, Scalar]
    ) -> tuple[float, int, dict[str, Scalar]]:
        """Local accuracy on the local test set, beside the untrained floor: the same protocol on
        the initial model at this bitwidth (the seed's weights, as every client starts). The
        loss Flower gets is the cross-entropy of the model scored (``local-loss``).

        SSL: a linear probe at this bitwidth on the frozen received model's encoder, trained on
        the local labelled share (final epoch). Supervised: this device's own low-bit model from
        its last training (the received one if it never trained); its encoder is also scored by
        the SSL probe (``local-probe-accuracy``), so supervised and SSL rows compare methods, not
        protocols. A device whose data has no labels reports no score (0 test examples).
        """
        test = self.data.test
        if test is None:
            return 0.0, 0, self._metrics(**{"local-model": "unlabelled"})
        self._load(parameters)
        own = self.objective.supervised and LOCAL_MODEL in self.state
        if own:
            local = self.state[LOCAL_MODEL].to_numpy_ndarrays()
            self.model.load_state_dict(decode_state(local, self.bits, self.model.state_dict()))
        untrained = new_model(self.config, self.bits, *self._shape())
        probe = self._probe(self.model.encoder)
        test_features = self._features(self.model.encoder, test)
        metrics: dict[str, Scalar] = {
            "local-probe-accuracy": probe.accuracy(test_features, test.labels),
            "untrained-local-probe-accuracy": self._probe(untrained.encoder).accuracy(
                self._features(untrained.encoder, test), test.labels
            ),
        }
        test_images = self.data.spec.normalize(test.images)
        for prefix, model in (("", self.model), ("untrained-", untrained)):
            score = self.objective.own_accuracy(model, test_images, test.labels)
            metrics[f"{prefix}local-accuracy"] = (
                metrics[f"{prefix}local-probe-accuracy"] if score is None else score
            )
        own_loss = self.objective.own_loss(self.model, test_images, test.labels)
        metrics["local-loss"] = (  # the cross-entropy of what local-accuracy scores
            probe.loss(test_features, test.labels) if own_loss is None else own_loss
        )
        if self.objective.supervised:
            metrics["local-model"] = "own" if own else "received"
        if self.model_dir:
            payload = encode_state(self.model.state_dict(), self.bits)
            saved = save_client_model(
                Path(self.model_dir), self.partition_id, payload, None if own else probe
            )
            metrics["saved-model"] = str(saved)
        return float(metrics["local-loss"]), len(test), self._metrics(**metrics)

    def _features(self, encoder: torch.nn.Module, part: ImageData) -> torch.Tensor:
        return extract_features(encoder, self.data.spec.normalize(part.images))

    def _probe(self, encoder: torch.nn.Module) -> LinearProbe:
        """The SSL protocol's probe: linear, at this bitwidth, on ``encoder``'s frozen features
        of the local labelled share (final epoch; scored on the local test set)."""
        return train_linear_probe(
            self._features(encoder, self.data.train),
            self.data.train.labels,
            self.data.spec.num_classes,
            self.bits,
            epochs=LOCAL_PROBE_EPOCHS,
            seed=self.config.seed,
        )


def torch_threads(cpus: float | int | None) -> int:
    """Threads for torch from the client's CPU resources (at least one)."""
    threads = max(1, int(cpus or 1))
    torch.set_num_threads(threads)
    return threads
