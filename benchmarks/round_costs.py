"""Communication and time per round of a finished run, from its results folder.

    python simulation.py --output-dir results/quickstart    # the default quickstart
    python benchmarks/round_costs.py results/quickstart     # writes benchmarks/results/

Uplink bytes are those of the arrays the clients actually sent; the fp32 equivalent is the same
model sent as float32 by the same clients; the ideal ratio counts s bits per quantized weight and
4 bytes per full-precision element. Server phase times are set against the clients' summed
training time (clients train in parallel in deployment, so that sum is their total compute).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import harness

from common.config import ExperimentConfig
from common.runs.experiment import new_model
from common.wire.payload import is_quantized

SERVER_GOAL = 0.3  # issue 27: server seconds / clients' summed training seconds


def ideal_ratio(config: ExperimentConfig, channels: int) -> float:
    state = new_model(config, 32, channels, 10).state_dict()
    quantized = sum(t.numel() for k, t in state.items() if is_quantized(k, t))
    other = sum(t.numel() for k, t in state.items() if not is_quantized(k, t))
    ideal = [quantized * b / 8 + 4 * other for b in config.bitwidths]
    return sum(ideal) / (len(ideal) * 4 * (quantized + other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    config = ExperimentConfig.from_mapping(json.loads((args.run_dir / "config.json").read_text()))
    channels = 3 if config.dataset.startswith("cifar") else 1
    rows = []
    for line in (args.run_dir / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        clients = record["clients"]
        server = record["server-seconds"]
        training = sum(c["train-seconds"] for c in clients)
        rows.append(
            {
                "round": record["round"],
                "uplink_ratio_to_fp32": sum(c["uplink-bytes"] for c in clients)
                / record["fp32-equivalent-bytes"],
                "client_train_seconds_sum": training,
                "client_train_steps_sum": sum(c["train-steps"] for c in clients),
                "server_steps": record["server-steps"],
                "round_seconds": record["round-seconds"],
                "server_seconds": sum(server.values()),
                "server_vs_clients": sum(server.values()) / training,
                # a client on a GPU reports its peak GPU memory in the round (None on the CPU)
                "client_gpu_peak_mb_max": max(
                    (c["gpu-peak-mb"] for c in clients if c.get("gpu-peak-mb")), default=None
                ),
                "client_peak_rss_mb_max": max(
                    (c["peak-rss-mb"] for c in clients if c.get("peak-rss-mb")), default=None
                ),
                **{f"server_{k}_seconds": v for k, v in server.items()},
            }
        )
    ideal = ideal_ratio(config, channels)
    uplink = statistics.mean(r["uplink_ratio_to_fp32"] for r in rows)
    server_share = sum(r["server_seconds"] for r in rows) / sum(
        r["client_train_seconds_sum"] for r in rows
    )
    harness.write_result(
        "round_costs",
        f"python benchmarks/round_costs.py {args.run_dir}",
        [
            harness.headline("uplink bytes / fp32, mean over rounds", uplink),
            harness.headline("uplink / ideal (s bits a weight, 4 bytes a float)", uplink / ideal),
            harness.headline(
                "server seconds / clients' summed training seconds, whole run",
                server_share,
                f"<= {SERVER_GOAL}",
                server_share <= SERVER_GOAL,
            ),
        ],
        [
            ("round", "round", "d"),
            ("uplink_ratio_to_fp32", "uplink / fp32", ".4f"),
            ("round_seconds", "round s", ".1f"),
            ("client_train_steps_sum", "clients' steps", "d"),
            ("client_train_seconds_sum", "clients' training s (sum)", ".1f"),
            ("server_steps", "server steps", "d"),
            ("server_dequantize_seconds", "de-quantize s", ".1f"),
            ("server_requantize_seconds", "re-quantize s", ".1f"),
            ("server_vs_clients", "server / clients", ".2f"),
            ("client_peak_rss_mb_max", "client peak RSS MB", ".0f"),
            ("client_gpu_peak_mb_max", "client GPU peak MB", ".0f"),
        ],
        rows,
        config={k: v for k, v in config.to_dict().items() if k not in ("output-dir", "data-dir")},
        ideal_uplink_ratio=ideal,
    )


if __name__ == "__main__":
    main()
