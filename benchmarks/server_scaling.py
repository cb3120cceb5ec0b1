"""Server seconds and peak memory of one Fed-QSSL round as the clients grow, at the authors' budget.

Each (clients, server-workers) setting runs in a fresh process with the quickstart's model, buffer
D_g and bitwidths, and the server's fine-tunes at the authors' length (``dq-epochs`` and
``rq-epochs`` = the clients' ``local-epochs``, 3: 12 steps of D_g each): N fabricated clients (the
initial model, perturbed per client, encoded at its bitwidth, as Flower would hand the strategy
their packed payloads) go through one server round (``ServerRound.run``: decode, de-quantize,
fold, re-quantize, then the strategy's encoding of each bitwidth's model), each payload decoded
only when the server reaches it. Peak memory growth of the round is read from the kernel's
peak-RSS mark of the server process under the default allocator, as users run it (with worker
processes: the parent's, which holds the received and folded states; each worker holds one
fine-tune). The clients' side is one client's local training as the quickstart trains it (2000
images, E = 3), timed at 4, 8 and 12 bits in the same process: N times its mean is the clients'
summed training seconds.

    python benchmarks/server_scaling.py    # writes benchmarks/results/server_scaling.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import harness
import torch

from common.memory import peak_resident_mb, reset_peak, resident_mb

PRESET = harness.ROOT / "configs" / "quickstart.yaml"
AUTHORS_BUDGET = {"dq-epochs": "local", "rq-epochs": "local"}
CLIENT_IMAGES = 2000  # the quickstart's max-samples-per-client
RATIO_GOAL = 0.3  # issue 27: server seconds / clients' summed training seconds, a round


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
    """Mean seconds of one quickstart client's local training (2000 images, E = 3)."""
    from common.learning.training import fit_local, recipe
    from common.runs.experiment import new_model

    repeats = -(-CLIENT_IMAGES // len(data.buffer))
    images = data.buffer.repeat(repeats, 1, 1, 1)[:CLIENT_IMAGES]  # stand-in for its own images
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


def measure_in_this_process(count: int, workers: int, with_clients: bool) -> dict:
    from common.config import ExperimentConfig, read_yaml_mapping
    from common.runs.experiment import server_data
    from common.wire.payload import decode_state, encode_state
    from fedqssl_server.rounds import server_round_for

    settings = {**read_yaml_mapping(PRESET), **AUTHORS_BUDGET, "server-workers": workers}
    config = ExperimentConfig.from_mapping(settings)
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
    examples = dict.fromkeys(received, CLIENT_IMAGES)
    server.fine_tunes.start()  # the workers start before the clock: once per run, not per round
    reset_peak()
    before = resident_mb()
    start = time.perf_counter()
    outcome = server.run(1, current, received, examples, set(config.bitwidths))
    downlink = {bits: encode_state(state, bits) for bits, state in outcome.requantized.items()}
    seconds = time.perf_counter() - start
    del downlink
    growth_mb = peak_resident_mb() - before
    server.fine_tunes.close()
    return {
        "clients": count,
        "server_workers": workers,
        "server_steps": sum(outcome.steps.values()),
        "server_seconds": seconds,
        "dequantize_seconds": outcome.seconds["dequantize"],
        "requantize_seconds": outcome.seconds["requantize"],
        "server_growth_mb": growth_mb,
        "client_train_seconds": client_train_seconds(config, data) if with_clients else None,
    }


COLUMNS = [
    ("clients", "clients", "d"),
    ("server_workers", "server-workers", "d"),
    ("server_steps", "server steps", ",d"),
    ("server_seconds", "server s / round", ".1f"),
    ("speedup_vs_one_worker", "speed-up vs 1 worker", ".2f"),
    ("server_vs_clients_training", "/ clients' summed training", ".3f"),
    ("server_growth_mb", "peak growth MB", ".0f"),
    ("growth_vs_fewest", "/ fewest clients", ".2f"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--workers", default="1,2", help="server-workers values to compare")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # clients,workers,with_clients
    args = parser.parse_args()
    if args.one:
        count, workers, with_clients = (int(part) for part in args.one.split(","))
        print(json.dumps(measure_in_this_process(count, workers, bool(with_clients))))
        return
    rows = []
    client_seconds = None
    for count in (int(c) for c in args.clients.split(",")):
        for workers in (int(w) for w in args.workers.split(",")):
            one = f"{count},{workers},{int(client_seconds is None)}"
            row = harness.in_fresh_process(__file__, ["--one", one])
            client_seconds = client_seconds or row["client_train_seconds"]
            row["client_train_seconds"] = client_seconds
            row["server_vs_clients_training"] = row["server_seconds"] / (count * client_seconds)
            rows.append(row)
            print(
                f"{count} clients, {workers} worker(s): server {row['server_seconds']:.1f} s "
                f"({row['server_vs_clients_training']:.3f} of the clients' summed training), "
                f"peak growth {row['server_growth_mb']:.0f} MB",
                flush=True,
            )
    fewest = min(row["clients"] for row in rows)
    for row in rows:
        same_workers = [r for r in rows if r["server_workers"] == row["server_workers"]]
        base = next(r for r in same_workers if r["clients"] == fewest)
        row["growth_vs_fewest"] = row["server_growth_mb"] / base["server_growth_mb"]
        alone = next(
            (r for r in rows if r["clients"] == row["clients"] and r["server_workers"] == 1), None
        )
        row["speedup_vs_one_worker"] = alone and alone["server_seconds"] / row["server_seconds"]
    headlines = [
        harness.headline(
            f"{row['clients']} clients, {row['server_workers']} worker(s): server seconds / "
            "clients' summed training seconds",
            row["server_vs_clients_training"],
            f"<= {RATIO_GOAL}",
            row["server_vs_clients_training"] <= RATIO_GOAL,
        )
        for row in rows
    ]
    most = max(row["clients"] for row in rows)
    headlines.append(
        harness.headline(
            f"peak growth at {most} clients / at {fewest} (memory flat in the clients)",
            max(row["growth_vs_fewest"] for row in rows),
            "<= 1.1",
            max(row["growth_vs_fewest"] for row in rows) <= 1.1,
        )
    )
    harness.write_result(
        "server_scaling",
        "python benchmarks/server_scaling.py",
        headlines,
        COLUMNS,
        rows,
        client_train_seconds=client_seconds,
        setup={"preset": PRESET.name, **AUTHORS_BUDGET},
    )


if __name__ == "__main__":
    main()
