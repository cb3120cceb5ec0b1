"""A 100-client ``flwr run`` simulation: the server's share of a round at fraction-fit 0.1 and 1.0.

Each setting is one ``simulation.py`` run (Flower's Ray backend, 2 actors of 1 CPU each) of
Fed-QSSL on synthetic data with 100 clients (a width-8 small CNN, about 9 images a client,
Dirichlet(10) partition sizes kept within 0.5-1.5x the mean: at Dirichlet(1) no draw in 1,000 keeps
100 clients of 9 images in that band), 2 rounds. From ``rounds.jsonl``: the server's
seconds a round (de-quantization, aggregation, re-quantization), the sampled clients' summed
training seconds, and the round's wall time, whose remainder is Flower's and Ray's own work
(scheduling 100 ClientApp calls onto 2 actors, moving payloads). Round 1 of the fraction-fit 0.1
run also asks every node which partition it is (``get_properties``), so that sampling is seeded by
partition, not by Flower's random node ids.

    python benchmarks/flwr_scaling.py     # writes benchmarks/results/flwr_scaling.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness

ACTORS = 2  # the simulation's default: 2 actors of 1 CPU each on this machine
COLUMNS = [
    ("fraction_fit", "fraction-fit", ".1f"),
    ("round", "round", "d"),
    ("clients", "clients", "d"),
    ("server_seconds", "server s", ".1f"),
    ("clients_training_seconds", "clients' training s (sum)", ".1f"),
    ("server_over_training", "server / training", ".2f"),
    ("round_seconds", "round s", ".1f"),
    ("other_seconds", "other s", ".1f"),
]
PRESET = """dataset: synthetic
model: small_cnn
model-width: 8
num-clients: 100
bitwidths: [4, 8]
dirichlet-beta: 10.0
partition-balance: 0.5
buffer-ratio: 0.1
num-rounds: 2
batch-size: 8
min-fit-clients: 5
probe-samples: 500
"""


def bitwidths(clients: int) -> str:
    return ",".join(str((4, 8)[k % 2]) for k in range(clients))


def one_run(workdir: Path, fraction: float, clients: int) -> tuple[list[dict], float]:
    """One ``simulation.py`` run at ``fraction``: a row per round, and the run's wall seconds."""
    preset = workdir / "scaling.yaml"
    preset.write_text(PRESET.replace("bitwidths: [4, 8]", f"bitwidths: [{bitwidths(clients)}]"))
    output = workdir / f"fraction-{fraction}"
    command = [
        sys.executable,
        str(harness.ROOT / "simulation.py"),
        str(preset),
        "--set",
        f"num-clients={clients}",
        "--set",
        f"fraction-fit={fraction}",
        "--output-dir",
        str(output),
        "--flwr-home",
        str(workdir / "flwr"),
    ]
    start = time.perf_counter()
    completed = subprocess.run(
        command, cwd=harness.ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"fraction {fraction}: {completed.stdout[-2000:]}{completed.stderr}")
    rounds = [json.loads(line) for line in (output / "rounds.jsonl").read_text().splitlines()]
    per_round = []
    for record in rounds:
        server = sum(record["server-seconds"].values())
        training = sum(c["train-seconds"] for c in record["clients"])
        per_round.append(
            {
                "fraction_fit": fraction,
                "round": record["round"],
                "clients": len(record["clients"]),
                "server_seconds": server,
                "clients_training_seconds": training,
                "server_over_training": server / training,
                "round_seconds": record["round-seconds"],
                "other_seconds": record["round-seconds"] - server - training / ACTORS,
            }
        )
    return per_round, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    args = parser.parse_args()
    rows, walls = [], {}
    with tempfile.TemporaryDirectory() as workdir:
        for fraction in (0.1, 1.0):
            per_round, walls[fraction] = one_run(Path(workdir), fraction, args.clients)
            rows += per_round
    last = {row["fraction_fit"]: row for row in rows if row["round"] == rows[-1]["round"]}
    harness.write_result(
        "flwr_scaling",
        "python benchmarks/flwr_scaling.py",
        [
            *(
                harness.headline(
                    f"fraction-fit {fraction}: the server's seconds in the last round",
                    row["server_seconds"],
                )
                for fraction, row in last.items()
            ),
            harness.headline(
                "Flower's and Ray's own ms per client call in the last round at fraction-fit 1.0",
                1000 * last[1.0]["other_seconds"] / last[1.0]["clients"],
            ),
        ],
        COLUMNS,
        rows,
        clients=args.clients,
        wall_seconds=walls,
        note=f"other s = round s - server s - clients' training s / {ACTORS} actors",
    )


if __name__ == "__main__":
    main()
