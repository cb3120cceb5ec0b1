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

from common.config import ExperimentConfig
from common.runs.experiment import new_model
from common.wire.payload import is_quantized

RESULTS = Path(__file__).parent / "results"


def ideal_ratio(config: ExperimentConfig, channels: int) -> float:
    state = new_model(config, 32, channels, 10).state_dict()
    quantized = sum(t.numel() for k, t in state.items() if is_quantized(k, t))
    other = sum(t.numel() for k, t in state.items() if not is_quantized(k, t))
    ideal = [quantized * b / 8 + 4 * other for b in config.bitwidths]
    return sum(ideal) / (len(ideal) * 4 * (quantized + other))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--output", type=Path, default=RESULTS / "round_costs.json")
    args = parser.parse_args()
    config = ExperimentConfig.from_mapping(json.loads((args.run_dir / "config.json").read_text()))
    channels = 3 if config.dataset.startswith("cifar") else 1
    rows = []
    for line in (args.run_dir / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        clients = record["clients"]
        rows.append(
            {
                "round": record["round"],
                "uplink_ratio_to_fp32": sum(c["uplink-bytes"] for c in clients)
                / record["fp32-equivalent-bytes"],
                "client_train_seconds_sum": sum(c["train-seconds"] for c in clients),
                "round_seconds": record["round-seconds"],
                # a client on a GPU reports its peak GPU memory in the round (None on the CPU)
                "client_gpu_peak_mb_max": max(
                    (c["gpu-peak-mb"] for c in clients if c.get("gpu-peak-mb")), default=None
                ),
                **{f"server_{k}_seconds": v for k, v in record["server-seconds"].items()},
            }
        )
    report = {
        "config": {
            k: v for k, v in config.to_dict().items() if k not in ("output-dir", "data-dir")
        },
        "ideal_uplink_ratio": ideal_ratio(config, channels),
        "rounds": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"bitwidths {','.join(map(str, config.bitwidths))}, model {config.model}: ideal uplink "
        f"ratio {report['ideal_uplink_ratio']:.4f}"
    )
    print(
        "| round | uplink / fp32 | round s | clients' training s (sum) | de-quantize s | "
        "aggregate s | re-quantize s | client GPU peak MB |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        gpu = row["client_gpu_peak_mb_max"]
        print(
            f"| {row['round']} | {row['uplink_ratio_to_fp32']:.4f} | {row['round_seconds']:.1f} | "
            f"{row['client_train_seconds_sum']:.1f} | {row['server_dequantize_seconds']:.1f} | "
            f"{row['server_aggregate_seconds']:.3f} | {row['server_requantize_seconds']:.1f} | "
            f"{'-' if gpu is None else f'{gpu:.0f}'} |"
        )
    mean = statistics.mean(r["uplink_ratio_to_fp32"] for r in rows)
    print(f"\nmean uplink ratio {mean:.4f}; written to {args.output}")


if __name__ == "__main__":
    main()
