"""A low-bit training step asks the host for almost nothing: on a GPU each ``.item()``,
``int()``, ``float()``, ``bool()`` or ``.tolist()`` of a tensor waits for the device. Counted
here on the CPU along the path a GPU takes (the fused CPU kernels off, seeds left on the
generator's device as a GPU generator's are), by patching those reads of ``torch.Tensor``."""

import collections
import sys
import traceback
from pathlib import Path

import pytest
import torch
from core_helpers import kernels

from common.config import ExperimentConfig
from common.learning.training import LowBitSettings, prepare_model, train_step
from common.lowbit import noise
from common.runs.experiment import new_model

ROOT = Path(__file__).resolve().parents[1]
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
# the step's one read: the loss it returns
ALLOWED_PER_STEP = 1


def device_seed(generator: torch.Generator | None) -> torch.Tensor:
    """``noise.draw_seed`` as a GPU generator runs it: the seed stays a tensor."""
    return torch.randint(noise.SEED_LIMIT, (1,), generator=generator).reshape(())


@pytest.mark.parametrize(
    ("model_name", "channels", "size"), [("small_cnn", 1, 28), ("resnet18", 3, 32)]
)
def test_a_low_bit_step_reads_the_host_once(monkeypatch, model_name, channels, size):
    reads: collections.Counter[str] = collections.Counter()
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = traceback.extract_stack(limit=2)[0]  # who asked: the project, or torch
            if caller.filename.startswith(str(ROOT / "common")):
                reads[f"{_name} at {Path(caller.filename).name}:{caller.lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    monkeypatch.setattr(noise, "draw_seed", device_seed)
    config = ExperimentConfig.from_mapping({"model": model_name, "model-width": 8})
    model = new_model(config, 4, channels, 10)
    settings = LowBitSettings(4)
    prepare_model(model, settings)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(8, channels, size, size, generator=generator) for _ in range(2)]
    with kernels(on=False):
        train_step(model, *views, optimizer, settings, 0.5, generator)  # Adam's state made
        reads.clear()
        for _ in range(2):
            train_step(model, *views, optimizer, settings, 0.5, generator)
    assert sum(reads.values()) <= 2 * ALLOWED_PER_STEP, dict(reads)
    assert sys.modules["common.lowbit.noise"].draw_seed is device_seed
