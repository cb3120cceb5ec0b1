"""A run's checkpoint: everything that decides the rounds still to come, written atomically.

After each completed round but the last, the server saves ``checkpoint.npz`` in the run's output
folder: the round number, the global model, the downlink of every bitwidth, each partition's
bitwidth, the round records so far and the run's config. Nothing else carries over between
rounds: every seed a round draws from (clients' training, D_g's views, the probes) is derived
from the config's seed and the round number, so a run resumed from round R's checkpoint computes
rounds R+1.. exactly as the uninterrupted run does.

The file is a NumPy ``.npz`` read with ``allow_pickle=False``: loading a checkpoint cannot run
code. The module holds NumPy arrays only (no torch), so the command line can inspect a
checkpoint without loading torch. It is written to a temporary file, flushed to disk and renamed
over the old one, so a run killed at any moment leaves the previous checkpoint or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.atomic import write_npz_atomically
from common.config import ExperimentConfig
from common.readback import NPZ_DAMAGE, RecordError, npz_array, read_json_object

CHECKPOINT_FILE = "checkpoint.npz"
# keys that may change between an interrupted run and its resumption: where it writes, and the
# instruction to resume itself
RESUME_FREE_KEYS = ("output-dir", "resume")
_META = "meta"


# what reading a damaged or foreign file can raise
class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, or made by a run with another config."""


@dataclass
class Checkpoint:
    """The state of a run after ``round`` completed rounds."""

    round: int
    config: dict[str, Any]
    global_state: dict[str, np.ndarray]
    downlink: dict[int, list[np.ndarray]]
    partition_bits: dict[int, int]
    records: list[dict[str, Any]]
    wall_seconds: float
    # each partition's own model, by partition, for an algorithm whose clients keep theirs
    # (``local-only``); empty otherwise
    personal: dict[int, list[np.ndarray]] = field(default_factory=dict)


def checkpoint_path(output_dir: str | os.PathLike[str]) -> Path:
    """Where a run in ``output_dir`` keeps its checkpoint."""
    return Path(output_dir) / CHECKPOINT_FILE


def save(checkpoint: Checkpoint, path: Path) -> None:
    """Write ``checkpoint`` to ``path`` atomically (temp file, fsync, rename, fsync the folder)."""
    arrays = {f"state/{name}": array for name, array in checkpoint.global_state.items()}
    for kind, payloads in (("downlink", checkpoint.downlink), ("personal", checkpoint.personal)):
        for key, payload in payloads.items():
            for index, array in enumerate(payload):
                arrays[f"{kind}/{key}/{index}"] = array
    meta = {
        "round": checkpoint.round,
        "config": checkpoint.config,
        "state-names": list(checkpoint.global_state),
        "downlink-lengths": {str(b): len(p) for b, p in checkpoint.downlink.items()},
        "personal-lengths": {str(k): len(p) for k, p in checkpoint.personal.items()},
        "partition-bits": {str(k): v for k, v in checkpoint.partition_bits.items()},
        "records": checkpoint.records,
        "wall-seconds": checkpoint.wall_seconds,
    }
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_npz_atomically(path, arrays)


def _meta_of(archive: np.lib.npyio.NpzFile) -> dict[str, Any]:
    return _checked_meta(json.loads(npz_array(archive, _META).tobytes().decode()))


def load(path: Path) -> Checkpoint:
    """Read a checkpoint; a damaged or foreign file is a ``CheckpointError`` naming it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = _meta_of(archive)
            state = {name: npz_array(archive, f"state/{name}") for name in meta["state-names"]}
            downlink, personal = (
                {
                    int(key): [npz_array(archive, f"{kind}/{key}/{i}") for i in range(count)]
                    for key, count in meta.get(f"{kind}-lengths", {}).items()
                }
                for kind in ("downlink", "personal")
            )
        return Checkpoint(
            round=int(meta["round"]),
            config=dict(meta["config"]),
            global_state=state,
            downlink=downlink,
            partition_bits={int(k): int(v) for k, v in meta["partition-bits"].items()},
            records=list(meta["records"]),
            wall_seconds=float(meta["wall-seconds"]),
            personal=personal,
        )
    except NPZ_DAMAGE as error:
        raise _damaged(path, error) from None


def _checked_meta(meta: object) -> dict[str, Any]:
    """A checkpoint's metadata, if it has the shape ``save`` writes (a ValueError otherwise)."""
    if not isinstance(meta, dict):
        raise ValueError(f"its metadata is a {type(meta).__name__}, not a mapping")
    for key, kind in (("round", int), ("config", dict), ("records", list)):
        if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
            raise ValueError(f"its metadata has no {key!r} of type {kind.__name__}")
    for key in ("downlink-lengths", "personal-lengths"):  # personal: absent in older files
        if not isinstance(meta.get(key, {}), dict):
            raise ValueError(f"its metadata's {key!r} is not a mapping")
    return meta


def _damaged(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); delete it to "
        "start the run over"
    )


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys (other than ``RESUME_FREE_KEYS``) whose values differ, each as ``key: a -> b``.
    A key the saved config lacks (a key newer than the run) counts as its default value."""
    defaults = ExperimentConfig().to_dict()
    saved = {**defaults, **saved}
    keys = sorted((set(saved) | set(current)) - set(RESUME_FREE_KEYS))
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in keys
        if saved.get(key) != current.get(key)
    ]


def require_same_config(saved: dict[str, Any], current: dict[str, Any], source: Path) -> None:
    """Refuse to continue a run under another config, naming every key that differs."""
    differences = config_differences(saved, current)
    if differences:
        raise CheckpointError(
            f"cannot resume from {source}: the config differs from the interrupted run's in "
            f"{'; '.join(differences)}. Resume with the same config, or start over in another "
            "--output-dir"
        )


def read_meta(path: Path) -> dict[str, Any]:
    """A checkpoint's round, config and records, without its arrays."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return _meta_of(archive)
    except NPZ_DAMAGE as error:
        raise _damaged(path, error) from None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run in a folder stands: ``finished`` (a readable summary of this config), or
    resumable from ``checkpoint`` after ``round`` completed rounds, or to start from round 1
    (``checkpoint`` None); ``note`` says which, for the log."""

    finished: bool
    round: int
    checkpoint: Path | None
    note: str


def resume_point(output_dir: str | os.PathLike[str], config: dict[str, Any]) -> ResumePoint:
    """What resuming ``config`` in ``output_dir`` does; a ``CheckpointError`` when the folder
    holds a run of another config (naming the keys) or a damaged checkpoint."""
    folder = Path(output_dir)
    summary = _readable_json(folder / "summary.json")
    if summary is not None and "global-accuracy" in summary:
        saved = _readable_json(folder / "config.json")
        if saved is None:
            raise CheckpointError(
                f"{folder} has a summary but no readable config.json: cannot tell which run it "
                "was; start over in another --output-dir"
            )
        require_same_config(saved, config, folder / "config.json")
        rounds = int(config.get("num-rounds", 0))
        return ResumePoint(True, rounds, None, f"{folder} holds this run, finished: nothing to do")
    damaged = "summary.json is unreadable; " if (folder / "summary.json").exists() else ""
    path = checkpoint_path(folder)
    if not path.exists():
        if damaged:  # a finished run (its checkpoint is deleted at the end) whose record broke
            raise CheckpointError(
                f"{folder / 'summary.json'} is not a readable summary (truncated, empty or not "
                "a file) and the folder holds no checkpoint, so the run looks finished: nothing "
                "was changed; restore the summary, or move the folder away to run it again"
            )
        return ResumePoint(False, 0, None, "no checkpoint: the run starts from round 1")
    meta = read_meta(path)
    require_same_config(meta["config"], config, path)
    return ResumePoint(
        False, int(meta["round"]), path, f"{damaged}resuming after round {meta['round']} ({path})"
    )


def reuse_problem(output_dir: str | os.PathLike[str], config: dict[str, Any]) -> str | None:
    """Why a new run (not resumed) of ``config`` may not write into ``output_dir``, or None: a
    missing or empty folder, or an interrupted run of the same config (it starts over), may be
    used; a finished run (resume keeps it), a run of another config or a folder of anything
    else may not, since the run would overwrite what is there."""
    folder = Path(output_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    if (folder / "summary.json").exists():
        return (
            f"{folder} holds a finished run: give --resume to keep it and its results, or "
            "another --output-dir"
        )
    saved = _readable_json(folder / "config.json")
    if saved is None:
        return f"{folder} is not empty and holds no fedqssl run: give a new or empty --output-dir"
    differences = config_differences(saved, config)
    if differences:
        return (
            f"{folder} holds a run of another config ({'; '.join(differences)}): give another "
            "--output-dir, or the same config with --resume"
        )
    return None


def _readable_json(path: Path) -> dict | None:
    try:
        return read_json_object(path)
    except RecordError:
        return None
