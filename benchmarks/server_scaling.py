"""Server seconds and peak memory of one Fed-QSSL round as the number of clients grows.

Each client count runs in a fresh process, with the 10-client quickstart's model, buffer D_g
and bitwidth mix (the default before 2026-12-02, kept here so the results stay comparable): N
fabricated clients (the initial model, perturbed per client, encoded at its bitwidth, as Flower
would hand the strategy their packed payloads) go through one server round
(``ServerRound.run``: decode, de-quantize, fold, re-quantize, then the strategy's encoding of each
bitwidth's model), each payload decoded only when the server reaches it. Peak memory growth of
the round is read as in ``step_memory.py`` (peak-RSS mark reset before it, glibc's fixed mmap
threshold). The clients' side is one client's local training on 500 images (the quickstart's
cap, E = 1), timed at 4, 8 and 12 bits in the same process: N times its mean is the clients'
summed training seconds.

    python benchmarks/server_scaling.py        # writes benchmarks/results/server_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.memory import peak_resident_mb, reset_peak, resident_mb

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parent.parent
PRESET = ROOT / "configs" / "quickstart.yaml"
# glibc keeps freed heap memory resident, so a peak RSS would count the allocator's history;
# with a fixed mmap threshold every tensor over 64 KiB is its own mapping, returned on free
# (it also makes every large allocation fault its pages afresh: the timings are pessimistic)
MALLOC_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
# the 10-client quickstart every recorded result of this benchmark measured (its other keys are
# the preset's)
MEASURED_SETUP = {
    "model-width": 32,
    "num-clients": 10,
    "bitwidths": "4,4,6,6,6,8,8,8,12,12",
    "local-epochs": 1,
    "learning-rate": 0.001,
    "max-samples-per-client": 500,
    "probe-samples": 2000,
}


def fabricated_payloads(server, bitwidths: tuple[int, ...], count: int) -> list[tuple[int, list]]:
    from common.wire.payload import encode_state

    initial = server.initial_state()
    payloads = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        state = {
            name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
            if tensor.is_floating_point()
            else tensor
            for name, tensor in initial.items()
        }
        bits = bitwidths[index % len(bitwidths)]
        payloads.append((bits, encode_state(state, bits)))
    return payloads


def client_train_seconds(config, data) -> float:
    """Mean seconds of one quickstart client's local training (500 images, E = 1)."""
    from common.learning.training import fit_local, recipe
    from common.runs.experiment import new_model

    images = data.buffer[:500]  # a stand-in for a client's own 500 images
    seconds = []
    for bits in (4, 8, 12):
        model = new_model(config, bits, data.spec.channels, data.spec.num_classes)
        start = time.perf_counter()
        fit_local(
            model,
            images,
            data.spec.augmentation(config.augmentation),
            recipe(config, bits),
            seed=bits,
        )
        seconds.append(time.perf_counter() - start)
    return statistics.mean(seconds)


def measure_in_this_process(count: int) -> dict:
    from common.config import ExperimentConfig, read_yaml_mapping
    from common.runs.experiment import server_data
    from common.wire.payload import decode_state, encode_state
    from fedqssl_server.rounds import server_round_for

    config = ExperimentConfig.from_mapping({**read_yaml_mapping(PRESET), **MEASURED_SETUP})
    data = server_data(config)
    server = server_round_for(config, data)
    current = server.initial_state()
    payloads = fabricated_payloads(server, config.bitwidths, count)
    received = {
        key: (
            lambda arrays=arrays, bits=bits: decode_state(
                arrays, expect_bits=bits, template=current
            )
        )
        for key, (bits, arrays) in enumerate(payloads)
    }
    examples = dict.fromkeys(received, 500)
    reset_peak()
    before = resident_mb()
    start = time.perf_counter()
    outcome = server.run(1, current, received, examples, set(config.bitwidths))
    downlink = {bits: encode_state(state, bits) for bits, state in outcome.requantized.items()}
    seconds = time.perf_counter() - start
    del downlink
    growth_mb = peak_resident_mb() - before
    return {
        "clients": count,
        "server_seconds": seconds,
        "server_phase_seconds": outcome.seconds,
        "server_growth_mb": growth_mb,
        "client_train_seconds": client_train_seconds(config, data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50,100,200")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_in_this_process(args.one)))
        return
    rows = []
    for count in (int(c) for c in args.clients.split(",")):
        command = [sys.executable, __file__, "--one", str(count)]
        output = subprocess.run(
            command, check=True, capture_output=True, text=True, cwd=ROOT, env=MALLOC_ENV
        )
        row = json.loads(output.stdout.strip().splitlines()[-1])
        row["server_vs_clients_training"] = row["server_seconds"] / (
            count * row["client_train_seconds"]
        )
        rows.append(row)
        print(
            f"{count} clients: server {row['server_seconds']:.1f} s "
            f"({row['server_vs_clients_training']:.2f} of the clients' summed training), "
            f"peak growth {row['server_growth_mb']:.0f} MB",
            flush=True,
        )
    for row in rows:
        row["growth_vs_fewest"] = row["server_growth_mb"] / rows[0]["server_growth_mb"]
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "server_scaling.json"
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "preset": PRESET.name}
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(
        "\n| clients | server s / round | / clients' summed training | peak growth MB | / fewest |"
    )
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['clients']} | {row['server_seconds']:.1f} | "
            f"{row['server_vs_clients_training']:.2f} | {row['server_growth_mb']:.0f} | "
            f"{row['growth_vs_fewest']:.2f} |"
        )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
