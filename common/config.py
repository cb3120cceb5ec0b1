"""One typed, validated experiment configuration, from Flower's run config or from YAML.

Keys are kebab-case (``num-clients``), as in ``[tool.flwr.app.config]``; YAML may also use
snake_case. Flower's run config holds scalars only, so ``bitwidths`` is a comma-separated string
there (``"4,4,6,6,6,8,8,8,12,12"``) and may be a list in YAML. Every invalid value is rejected with
a message that names the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from common.algorithms import ALGORITHM_NAMES
from common.vocabulary import (
    DATASET_NAMES,
    FP_ACTIVATIONS,
    FULL_PRECISION,
    MAX_BITS,
    MIN_BITS,
    MODEL_NAMES,
    check_bits,
)

WEIGHT_UPDATES = ("latent", "grid")
GRAD_ROUNDINGS = ("stochastic", "deterministic")
AUGMENTATIONS = ("batched", "per-image")
MAX_SEED = 2**31
DQ_WEIGHTINGS = ("softmax", "uniform", "highest-bits")
DEVICES = ("auto", "cpu", "cuda")
# how a client process's allocator treats freed memory (common.memory): lean gives it back (a
# low-bit step then peaks below an fp32 one, at about twice the step time), fast keeps glibc's
# default; auto is lean on a deployed device (a SuperNode) and fast in a Ray simulation
ALLOCATORS = ("auto", "lean", "fast")
# BatchNorm statistics re-estimated on D_g after aggregation: of the global model, or of it and
# of each bitwidth's downlink
BN_RECALIBRATIONS = ("none", "global", "all")
# dq-epochs / rq-epochs may name the clients' local-epochs: the authors' code trains every de- and
# re-quantization for the clients' E (the paper gives no number)
LOCAL_EPOCHS = "local"


class ConfigError(ValueError):
    """An invalid configuration value or key; the message names the key and the allowed values."""


def _key(default: Any, doc: str, allowed: tuple[str, ...] = ()) -> Any:
    """A config key: its default, what it sets (``doc``) and its allowed values, which
    ``docs/configuration.md`` is generated from (``common.config_reference``)."""
    return dataclasses.field(default=default, metadata={"doc": doc, "allowed": allowed})


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything one Fed-QSSL run needs. Defaults are the CPU quickstart."""

    algorithm: str = _key(
        "fedqssl",
        "the federated algorithm (a row of `common/algorithms.py`)",
        allowed=ALGORITHM_NAMES,
    )
    dataset: str = _key(
        "fashion-mnist",
        "fashion-mnist (offline, Debian's package), cifar10 / cifar100 (from `data-dir`), "
        "synthetic (tests)",
        allowed=DATASET_NAMES,
    )
    data_dir: str = _key("", "folder holding CIFAR-10/100 (empty: the default place)")
    download: bool = _key(
        False, "let torchvision download CIFAR into `data-dir` (needs internet; off here)"
    )
    buffer_dir: str = _key(
        "",
        "a folder of the server's own unlabelled images for D_g, instead of a share of the dataset",
    )
    probe_dir: str = _key(
        "", "a folder of the server's own labelled images for the global probe and kNN"
    )
    local_test_fraction: float = _key(
        0.2, "share of a device's own labelled data held out for its local score"
    )
    model: str = _key(
        "small_cnn", "small_cnn (CPU) or resnet18 (the CIFAR ResNet-18, GPU)", allowed=MODEL_NAMES
    )
    model_width: int = _key(16, "the small CNN's first-layer channels")
    num_clients: int = _key(4, "clients, one data partition (and SuperNode) each")
    bitwidths: tuple[int, ...] = _key(
        (4, 6, 8, 12), "one per client (2..16, or 32 for full precision), or one for all"
    )
    dirichlet_beta: float = _key(
        0.1, "label skew of the partition, Dirichlet(beta) (smaller: more skewed)"
    )
    balanced_partition: bool = _key(
        False, "a client stops taking classes at N/K samples, as the authors' code"
    )
    partition_balance: float = _key(
        0.0,
        "redraw the partition until every client holds (1 +- this) x the mean (0: off; the "
        "authors': 0.5)",
    )
    buffer_ratio: float = _key(0.01, "share of the training pool kept as the server buffer D_g")
    num_rounds: int = _key(4, "federated rounds")
    local_epochs: int = _key(3, "E, each client's epochs a round")
    batch_size: int = _key(128, "client and server batch size")
    learning_rate: float = _key(3e-3, "Adam's learning rate, clients and server")
    temperature: float = _key(0.5, "SimCLR's NT-Xent temperature")
    weight_update: str = _key(
        "grid",
        "grid: weights rounded back onto the s-bit grid after every step (the paper's w <- Q(w - "
        "lr g)); latent: float32 weights quantized in the forward pass only",
        allowed=WEIGHT_UPDATES,
    )
    grad_rounding: str = _key(
        "stochastic",
        "how a gradient value is rounded between its two quantile centres: stochastic (unbiased, "
        "the paper's Assumption 1) or deterministic (nearest)",
        allowed=GRAD_ROUNDINGS,
    )
    save_codes: bool = _key(
        True,
        "backward keeps low-bit codes instead of float32 copies, recomputing cheap layer outputs "
        "(the same numbers, less memory)",
    )
    fp_activation: str = _key(
        "relu",
        "a 32-bit model's nonlinearity: relu (the paper's) or clamp (the low-bit clients' clamp(0,"
        " 1), a control)",
        allowed=FP_ACTIVATIONS,
    )
    augmentation: str = _key(
        "batched",
        "SimCLR's views: batched (tensor ops on whole batches, CPU or GPU) or per-image "
        "(torchvision)",
        allowed=AUGMENTATIONS,
    )
    dq_epochs: int | str = _key(
        1,
        "epochs of D_g per de-quantization, or `local` (the clients' `local-epochs`, as the "
        "authors' code)",
    )
    rq_epochs: int | str = _key(
        1, "epochs of D_g per re-quantization, or `local`; 0 re-quantizes by rounding"
    )
    dq_temperature: float = _key(1.0, "T in p_k = softmax(-L_DQ / T)")
    dq_weighting: str = _key(
        "softmax",
        "softmax (the paper's p_k), uniform (p_k = 1/K, a control) or highest-bits (uniform "
        "over the models at the highest bitwidth received, 0 for the others: a control)",
        allowed=DQ_WEIGHTINGS,
    )
    bn_recalibrate: str = _key(
        "none",
        "re-estimate BatchNorm statistics on D_g after aggregation: none, global (the global "
        "model), all (each downlink too, at its bitwidth)",
        allowed=BN_RECALIBRATIONS,
    )
    server_workers: int = _key(
        1,
        "processes running the server's fine-tunes side by side (CPU only; the same numbers up to "
        "float order)",
    )
    proximal_mu: float = _key(0.01, "FedProx's mu")
    qsgd_bucket: int = _key(512, "FedPAQ: entries per QSGD norm (0: the whole tensor)")
    fraction_fit: float = _key(
        1.0, "share of clients a round samples (seeded by the seed and round)"
    )
    min_fit_clients: int = _key(2, "a round with fewer usable models fails, and the run with it")
    round_timeout: float = _key(
        0.0, "seconds a round waits for its clients (0: every sampled client); for deployments"
    )
    partition_bindings: str = _key(
        "",
        "a JSON file binding each partition to a SuperNode's key (written by "
        "`scripts/deploy/register.sh`)",
    )
    max_samples_per_client: int = _key(
        2000, "cap on a client's training images, a seeded draw (0: all)"
    )
    max_client_examples: int = _key(
        100_000,
        "a reply claiming more training examples is refused (it would outweigh every other client)",
    )
    probe_samples: int = _key(200, "labelled train images of the global probe and kNN monitor")
    seed: int = _key(0, "every random draw of the run derives from it (`common/seeds.py`)")
    device: str = _key(
        "auto", "auto (the GPU where the process sees one), cpu or cuda", allowed=DEVICES
    )
    tf32: bool = _key(
        False,
        "let CUDA convolutions and matmuls run in TF32 (false: the stated precision, which the "
        "bitwidth comparisons assume; a 12-bit activation keeps its 4,096 levels)",
    )
    allocator: str = _key(
        "auto",
        "a client process's memory: lean (freed memory goes back: lower peaks, slower), fast "
        "(glibc's default), auto (lean on a SuperNode, fast in a simulation)",
        allowed=ALLOCATORS,
    )
    output_dir: str = _key("", "the run's folder (empty: a new `results/run-<time>/`)")
    resume: bool = _key(False, "continue the run in `output-dir` from its checkpoint")

    def __post_init__(self) -> None:
        _validate(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ExperimentConfig:
        """Build from a flat mapping (Flower run config or parsed YAML); unknown keys are errors."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for raw_key, value in values.items():
            key = str(raw_key).replace("-", "_")
            if key in kwargs:
                raise ConfigError(
                    f"config key {key.replace('_', '-')!r} is given twice (as {raw_key!r} and "
                    "before): give it once"
                )
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0].replace('_', '-')!r}?" if close else ""
                raise ConfigError(f"unknown config key {raw_key!r}{hint}")
            kwargs[key] = _coerce(key, value, known[key].type)
        return cls(**kwargs)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ExperimentConfig:
        """Build from a YAML file of the same keys."""
        return cls.from_mapping(read_yaml_mapping(path))

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case keys, ``bitwidths`` as a list: for results files."""
        return {
            f.name.replace("_", "-"): list(getattr(self, f.name))
            if f.name == "bitwidths"
            else getattr(self, f.name)
            for f in dataclasses.fields(self)
        }

    @property
    def dequantize_epochs(self) -> int:
        """Epochs of D_g per de-quantization (and per fine-tune of the ``fedsimclr-ft`` control):
        ``dq-epochs``, or the clients' ``local-epochs`` when it says ``local``."""
        return self.local_epochs if self.dq_epochs == LOCAL_EPOCHS else int(self.dq_epochs)

    @property
    def requantize_epochs(self) -> int:
        """Epochs of D_g per re-quantization: ``rq-epochs``, or ``local-epochs`` (``local``)."""
        return self.local_epochs if self.rq_epochs == LOCAL_EPOCHS else int(self.rq_epochs)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flat scalars for Flower's ``--run-config`` (``bitwidths`` as a string)."""
        values = self.to_dict()
        values["bitwidths"] = ",".join(str(b) for b in self.bitwidths)
        return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (plain YAML
    keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(
                    f"config key {key!r} is given twice (line {key_node.start_mark.line + 1}): "
                    "give it once"
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file's top-level mapping; duplicate keys and a non-mapping are ConfigErrors."""
    with open(path, encoding="utf-8") as handle:
        try:
            values = yaml.load(handle, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(values).__name__}")
    return values


def parse_bitwidths(value: Any) -> tuple[int, ...]:
    """``"4,4,6"``, ``[4, 4, 6]`` or ``8`` -> a tuple of ints (not yet range-checked)."""
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, int) and not isinstance(items, bool):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise ConfigError(
            f"bitwidths must be a comma-separated list of integers like '4,4,6,6,6,8,8,8,12,12', "
            f"got {value!r}"
        )
    try:
        return tuple(_to_int(str(item).strip()) for item in items)
    except (TypeError, ValueError) as error:
        raise ConfigError(
            f"bitwidths must be a comma-separated list of integers like '4,4,6,6,6,8,8,8,12,12', "
            f"got {value!r}"
        ) from error


def check_bitwidth(bits: int) -> int:
    """``bits`` if it is an allowed bitwidth (``quant.check_bits``: the one rule), else a
    ConfigError naming the allowed ones."""
    try:
        return check_bits(bits)
    except ValueError:
        allowed = f"{MIN_BITS}..{MAX_BITS} or {FULL_PRECISION}"
        raise ConfigError(
            f"bitwidths: bitwidth {bits} is not allowed: each must be {allowed}"
        ) from None


def _to_int(text: str) -> int:
    number = float(text)
    if not number.is_integer():
        raise ValueError(text)
    return int(number)


def _coerce(key: str, value: Any, annotation: str) -> Any:
    name = key.replace("_", "-")
    if annotation == "tuple[int, ...]":
        return parse_bitwidths(value)
    if annotation == "int | str":  # a number of epochs, or ``local``
        if isinstance(value, str) and value.strip().lower() == LOCAL_EPOCHS:
            return LOCAL_EPOCHS
        try:
            if isinstance(value, bool):
                raise ValueError
            return _to_int(str(value))
        except ValueError:
            raise ConfigError(
                f"{name} must be an integer or {LOCAL_EPOCHS!r} (the clients' local-epochs, as "
                f"the authors' code), got {value!r}"
            ) from None
    if annotation == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
            return value.strip().lower() in ("true", "1")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if annotation == "int":
        try:
            if isinstance(value, bool):
                raise ValueError
            return _to_int(str(value))
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if annotation == "float":
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return number
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key.replace('_', '-')}: {message}")


def _one_of(config: ExperimentConfig, key: str, allowed: tuple[str, ...]) -> None:
    value = getattr(config, key)
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def _validate(config: ExperimentConfig) -> None:
    _one_of(config, "algorithm", ALGORITHM_NAMES)
    _one_of(config, "dataset", DATASET_NAMES)
    _one_of(config, "model", MODEL_NAMES)
    _one_of(config, "weight_update", WEIGHT_UPDATES)
    _one_of(config, "grad_rounding", GRAD_ROUNDINGS)
    _one_of(config, "augmentation", AUGMENTATIONS)
    _one_of(config, "fp_activation", FP_ACTIVATIONS)
    _one_of(config, "dq_weighting", DQ_WEIGHTINGS)
    _one_of(config, "bn_recalibrate", BN_RECALIBRATIONS)
    _one_of(config, "device", DEVICES)
    _one_of(config, "allocator", ALLOCATORS)
    for key in (
        "model_width",
        "num_clients",
        "num_rounds",
        "local_epochs",
        "min_fit_clients",
        "max_client_examples",
        "probe_samples",
        "server_workers",
    ):
        _require(getattr(config, key) >= 1, key, f"must be >= 1, got {getattr(config, key)}")
    for key, least in (("dq_epochs", 1), ("rq_epochs", 0)):
        value = getattr(config, key)
        _require(
            value == LOCAL_EPOCHS or (isinstance(value, int) and value >= least),
            key,
            f"must be an integer >= {least} or {LOCAL_EPOCHS!r} (the clients' local-epochs), "
            f"got {value!r}",
        )
    _require(
        config.batch_size >= 2,
        "batch_size",
        f"must be >= 2 (BatchNorm and the contrastive loss need two samples), "
        f"got {config.batch_size}",
    )
    _require(
        0 <= config.seed < MAX_SEED,
        "seed",
        f"must be in [0, 2**31) (seeds of rounds and clients are derived from it), "
        f"got {config.seed}",
    )
    for key in ("max_samples_per_client", "proximal_mu", "qsgd_bucket"):
        _require(getattr(config, key) >= 0, key, f"must be >= 0, got {getattr(config, key)}")
    _require(
        config.round_timeout >= 0,
        "round_timeout",
        f"must be >= 0 seconds (0: wait for every sampled client), got {config.round_timeout}",
    )
    for key in ("dirichlet_beta", "learning_rate", "temperature", "dq_temperature"):
        _require(getattr(config, key) > 0, key, f"must be > 0, got {getattr(config, key)}")
    _require(
        0 <= config.partition_balance < 1,
        "partition_balance",
        f"must be in [0, 1) (0: any client sizes; 0.5: every client within 0.5-1.5x the mean, as "
        f"in the authors' code), got {config.partition_balance}",
    )
    _require(
        0 < config.buffer_ratio < 1,
        "buffer_ratio",
        f"must be in (0, 1) (the share of the training pool kept as the server buffer D_g), "
        f"got {config.buffer_ratio}",
    )
    _require(
        0 < config.local_test_fraction < 1,
        "local_test_fraction",
        f"must be in (0, 1) (the share of each class of a device's own labelled data held out "
        f"for its local score), got {config.local_test_fraction}",
    )
    _require(
        0 < config.fraction_fit <= 1,
        "fraction_fit",
        f"must be in (0, 1], got {config.fraction_fit}",
    )
    _require(
        config.min_fit_clients <= config.num_clients,
        "min_fit_clients",
        f"{config.min_fit_clients} exceeds num-clients {config.num_clients}",
    )
    for bits in config.bitwidths:
        check_bitwidth(bits)
    _require(
        len(config.bitwidths) in (1, config.num_clients),
        "bitwidths",
        f"{len(config.bitwidths)} values for {config.num_clients} clients: give one per "
        "client, or a single value for all",
    )
    if len(config.bitwidths) == 1 and config.num_clients > 1:
        object.__setattr__(config, "bitwidths", config.bitwidths * config.num_clients)
