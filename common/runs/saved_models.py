"""A run's trained models on disk, and the one way to load them back.

Each model is stored as the wire format carries it (``common.wire.payload``: header, packed codes,
floats, ints; a downlink exactly as it was sent, the global model as its float32 payload) in a
NumPy ``.npz`` read with ``allow_pickle=False``, so loading a model file cannot run code. Files
are written atomically (``common.atomic``): a run killed while saving leaves the old file or the
new one.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from common.atomic import write_npz_atomically
from common.config import ExperimentConfig
from common.learning.evaluation import LinearProbe
from common.learning.models import linear_probe
from common.readback import NPZ_DAMAGE, npz_array
from common.runs.experiment import run_model
from common.wire.payload import PayloadError, decode_state, payload_bits

MODELS_FOLDER = "models"
PAYLOAD_KEYS = ("header", "codes", "floats", "ints")  # the codec's four arrays, in order


class SavedModelError(ValueError):
    """A model file that cannot be read; the message names it."""


def save_payload(path: Path, payload: list[np.ndarray]) -> None:
    """One model's payload arrays (``encode_state``'s) as ``path``."""
    write_npz_atomically(path, dict(zip(PAYLOAD_KEYS, payload, strict=True)))


def read_payload(path: str | os.PathLike[str]) -> list[np.ndarray]:
    """A saved model's payload arrays; ``SavedModelError`` naming the file if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            payload = [npz_array(archive, key) for key in PAYLOAD_KEYS]
        payload_bits(payload)  # a readable header of this format
        return payload
    except NPZ_DAMAGE as error:
        raise SavedModelError(
            f"{path} is not a saved fedqssl model ({type(error).__name__}: {error})"
        ) from None


def save_run_models(
    output_dir: Path, global_payload: list[np.ndarray], downlink: dict[int, list[np.ndarray]]
) -> dict[str, str]:
    """The global model and each bitwidth's downlink as ``models/*.npz`` in the run folder;
    name -> path relative to the folder (``summary.json``'s ``models``)."""
    files = {"global": global_payload}
    files.update({f"downlink-{bits}bit": downlink[bits] for bits in sorted(downlink)})
    saved = {}
    for name, payload in files.items():
        relative = f"{MODELS_FOLDER}/{name}.npz"
        save_payload(output_dir / relative, payload)
        saved[name] = relative
    return saved


PROBE_KEYS = ("probe-weight", "probe-bias", "probe-mean", "probe-std")


def save_client_model(
    folder: Path, partition: int, payload: list[np.ndarray], probe: LinearProbe | None
) -> Path:
    """A device's personalized model, ``folder/client-<partition>.npz``: the model it scores
    (its payload at its bitwidth) and, when the protocol trained one, its local probe head."""
    arrays = dict(zip(PAYLOAD_KEYS, payload, strict=True))
    if probe is not None:
        tensors = (probe.layer.weight, probe.layer.bias, probe.mean, probe.std)
        arrays.update(
            {
                key: t.detach().cpu().float().numpy()
                for key, t in zip(PROBE_KEYS, tensors, strict=True)
            }
        )
    path = folder / f"client-{partition}.npz"
    write_npz_atomically(path, arrays)
    return path


def load_probe(path: str | os.PathLike[str]) -> LinearProbe:
    """The local probe head saved with a device's model (``save_client_model``).

    Args:
        path: a device's ``client-K.npz``.

    Returns:
        ``LinearProbe`` at the model's bitwidth, with the feature statistics it was trained on.

    Raises:
        SavedModelError: the file holds no probe head (a supervised device's model).
    """
    bits = payload_bits(read_payload(path))
    try:
        with np.load(path, allow_pickle=False) as archive:
            weight, bias, mean, std = (torch.from_numpy(npz_array(archive, k)) for k in PROBE_KEYS)
    except KeyError:
        raise SavedModelError(f"{path} holds no probe head (a supervised device's model)") from None
    except NPZ_DAMAGE as error:
        raise SavedModelError(f"{path}: its probe head is not readable ({error})") from None
    layer = linear_probe(weight.shape[1], weight.shape[0], bits)
    layer.load_state_dict({"weight": weight, "bias": bias})
    return LinearProbe(mean, std, layer.eval())


def load_model(path: str | os.PathLike[str], config: ExperimentConfig) -> torch.nn.Module:
    """A model a run kept, ready to score or embed.

    Args:
        path: a ``models/*.npz`` file of a run folder (the global model, a bitwidth's downlink)
            or a device's ``client-K.npz``.
        config: the run's config (its folder's ``config.json``): model, width, dataset shape.

    Returns:
        The run's model class at the bitwidth the file was saved at (a downlink at its
        clients' bitwidth, the global model at 32), in eval mode.

    Raises:
        SavedModelError: the file is not a saved model, or does not fit the run's model.
    """
    payload = read_payload(path)
    model = run_model(config, payload_bits(payload))
    try:
        model.load_state_dict(decode_state(payload, template=model.state_dict()))
    except PayloadError as error:
        raise SavedModelError(f"{path} does not fit this run's model: {error}") from None
    return model.eval()
