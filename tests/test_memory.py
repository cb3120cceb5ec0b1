"""A device's memory (common.memory): freed tensors go back to the system in every process that
runs a client, and each round records the peak resident memory its training needed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import federate, tiny_config

from common.memory import configure_allocator, peak_resident_mb, reset_peak, resident_mb

ROOT = Path(__file__).resolve().parents[1]
# glibc raises its mmap threshold when a large mapped block is freed: the 3 MiB tensor after the
# 4 MiB one then lives on the heap and stays resident after it is freed, unless the process fixed
# the threshold (a lean client's allocator)
RETAINED = """
import sys
import torch
from common.memory import configure_allocator, resident_mb
mode, where = sys.argv[1:3]
print(configure_allocator(mode, in_simulation=where == "simulation"))
first = torch.ones(1 << 20)
del first
before = resident_mb()
second = torch.ones(3 << 18)
del second
print(resident_mb() - before)
"""


def retained_mb(mode: str, where: str) -> tuple[str, float]:
    """(what the process's allocator became, MiB a freed 3 MiB tensor left resident)."""
    completed = subprocess.run(
        [sys.executable, "-c", RETAINED, mode, where],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    applied, retained = completed.stdout.split()
    return applied, float(retained)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc: Linux")
def test_a_lean_client_process_gives_freed_tensors_back_and_a_fast_one_keeps_them():
    applied, retained = retained_mb("fast", "device")
    assert applied == "fast" and retained > 2.5  # the control: glibc's default keeps the 3 MiB
    for mode, where in [("lean", "simulation"), ("auto", "device")]:
        applied, retained = retained_mb(mode, where)
        assert applied == "lean" and retained < 0.5, (mode, where)
    assert retained_mb("auto", "simulation") == ("fast", pytest.approx(3, abs=0.5))
    with pytest.raises(ValueError, match="allocator 'big' is not one of"):
        configure_allocator("big", in_simulation=False)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_the_peak_window_starts_at_reset_and_sees_what_was_touched():
    assert reset_peak()
    start = peak_resident_mb()
    assert start == pytest.approx(resident_mb(), abs=2)
    block = bytearray(64 << 20)  # 64 MiB, zero-filled: touched
    assert peak_resident_mb() >= start + 60
    del block
    reset_peak()
    assert peak_resident_mb() < start + 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_every_round_records_each_clients_peak_resident_memory(tmp_path):
    config = tiny_config(tmp_path, "fedqssl")
    federate(config)
    lines = Path(config.output_dir, "rounds.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    peaks = [client["peak-rss-mb"] for record in records for client in record["clients"]]
    assert len(peaks) == config.num_rounds * config.num_clients
    assert all(peak >= resident_mb() / 4 for peak in peaks)  # the process's, not a delta
    modes = {client["allocator"] for record in records for client in record["clients"]}
    assert modes <= {"lean", "fast"} and len(modes) == 1  # one process: one allocator


TRAINS_WITHOUT_TORCHVISION = """
import sys
import fedqssl_client.app  # what a SuperNode's ClientApp process imports
from common.config import ExperimentConfig
from common.wire.payload import encode_state
from fedqssl_client.client import LowBitClient

config = ExperimentConfig.from_mapping({"dataset": "synthetic", "model-width": 8,
    "num-clients": 2, "bitwidths": "4,8", "batch-size": 32, "max-samples-per-client": 64,
    "local-epochs": 1})
client = LowBitClient(config, 0, 4)
_, _, metrics = client.fit(encode_state(client.model.state_dict(), 32), {"server-round": 1})
print(metrics["train-steps"], "torchvision" in sys.modules)
"""


def test_a_client_that_trains_with_batched_views_never_imports_torchvision():
    """Flower starts a process per ClientApp message; torchvision's import alone costs each
    about 1.2 s and 170 MB (its ops pull in torch's compiler stack). The default, batched
    augmentation needs none of it: only per-image augmentation and evaluation import it."""
    completed = subprocess.run(
        [sys.executable, "-c", TRAINS_WITHOUT_TORCHVISION],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    steps, imported = completed.stdout.split()
    assert int(steps) > 0 and imported == "False", completed.stdout
