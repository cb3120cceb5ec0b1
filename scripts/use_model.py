"""Score or embed with a finished run's saved model (``RUN/models/*.npz``, named in its
``summary.json`` under ``models``).

    python scripts/use_model.py RUN                          # the global model, scored
    python scripts/use_model.py RUN --model downlink-4bit    # a bitwidth's downlink, scored
    python scripts/use_model.py RUN --embed IMAGES --out features.npy

Scoring applies the server's global protocol to the saved model (the run's probe set and seed:
kNN monitor and linear probe, final epoch), so the global model's scores equal the summary's.
Embedding writes the encoder's features of a folder of images (any layout ``local-data``
accepts: class folders, a flat folder, an ``.npz``, an idx pair) as an N x D float32 ``.npy``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.algorithms import get_algorithm
from common.config import ConfigError, ExperimentConfig
from common.data.local import load_images
from common.learning.models import extract_features
from common.readback import RecordError, read_json_object
from common.runs.experiment import DatasetSpec, run_model, server_data
from common.runs.saved_models import MODELS_FOLDER, load_model
from fedqssl_server.monitor import GlobalMonitor


def run_config(run: Path) -> ExperimentConfig:
    """The config the run in folder ``run`` recorded."""
    path = run / "config.json"
    if not path.exists():
        raise SystemExit(f"{run} holds no config.json: give the folder of a finished run")
    try:
        return ExperimentConfig.from_mapping(read_json_object(path, "run config"))
    except (RecordError, ConfigError) as error:
        raise SystemExit(f"{path}: {error}") from None


def model_path(run: Path, name: str) -> Path:
    """The file of saved model ``name``; an error listing the run's saved models if none."""
    path = run / MODELS_FOLDER / f"{name}.npz"
    if not path.is_file():
        known = sorted(p.stem for p in (run / MODELS_FOLDER).glob("*.npz"))
        raise SystemExit(f"{run} has no saved model {name!r}; it has: {', '.join(known) or 'none'}")
    return path


def score(run: Path, name: str = "global") -> dict[str, float]:
    """The global protocol's scores of saved model ``name`` of the run in ``run``."""
    config = run_config(run)
    model = load_model(model_path(run, name), config)
    monitor = GlobalMonitor(
        get_algorithm(config.algorithm),
        server_data(config),
        functools.partial(run_model, config),
        config,
    )
    return monitor.scores({k: v.detach().cpu() for k, v in model.state_dict().items()})


def embed(run: Path, name: str, images: Path) -> np.ndarray:
    """Features of the images at ``images`` from saved model ``name``'s encoder."""
    config = run_config(run)
    spec = DatasetSpec.of(config.dataset)
    data = load_images(images, *spec.shape)
    encoder = load_model(model_path(run, name), config).encoder
    return extract_features(encoder, spec.normalize(data.images)).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run's folder")
    parser.add_argument("--model", default="global", help="saved model name (default: global)")
    parser.add_argument("--embed", type=Path, help="a folder or file of images to embed")
    parser.add_argument("--out", type=Path, help="where --embed writes its features (.npy)")
    args = parser.parse_args(argv)
    if args.embed is not None:
        if args.out is None:
            parser.error("--embed needs --out FILE.npy")
        features = embed(args.run, args.model, args.embed)
        np.save(args.out, features)
        print(f"{len(features)} x {features.shape[1]} features of {args.embed} -> {args.out}")
        return 0
    scores = score(args.run, args.model)
    for key, value in scores.items():
        print(f"{key}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
