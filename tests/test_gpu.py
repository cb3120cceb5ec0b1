"""The GPU path, on a machine with a GPU (skipped elsewhere, saying so): a real ``flwr run``
simulation whose clients share one GPU at fractional shares trains every client on CUDA.

``benchmarks/gpu_check.sh`` runs this with the in-process algorithm tests (which train on CUDA
when torch sees a GPU) and the timed GPU benchmarks, as one command.
"""

import json

import pytest
import torch
from simulations import TINY, run_simulation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch can see"),
]


def test_clients_share_one_gpu_at_fractional_shares_and_train_on_it(tmp_path):
    # three clients at 0.3 of a GPU each: Ray may place all of them on the one GPU at once
    completed, status, output_dir = run_simulation(tmp_path, TINY, "--gpus-per-client", "0.3")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert status is not None and status["status"] == "finished:completed"
    rounds = [json.loads(line) for line in (output_dir / "rounds.jsonl").read_text().splitlines()]
    clients = [client for record in rounds for client in record["clients"]]
    assert len(clients) == 3 * 2  # every client in both rounds
    # a client reports its peak GPU memory only when its model is on CUDA: no CPU fallback
    assert all((client["gpu-peak-mb"] or 0) > 0 for client in clients), clients
    summary = json.loads((output_dir / "summary.json").read_text())
    assert summary["global-accuracy"] is not None
