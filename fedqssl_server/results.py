"""A run's records: one per round (``rounds.jsonl``), the summary (``summary.json``), the
resolved config and PNG plots in its output folder; and how each record is built."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.algorithms import Algorithm
from common.atomic import claim_new_folder, write_text_atomically
from common.config import ExperimentConfig
from common.runs import provenance
from common.vocabulary import FULL_PRECISION

# the app's root in the copy Flower runs (or the checkout): what a record's code-hash covers
APP_ROOT = Path(__file__).resolve().parents[1]

# what each client's evaluation reports: its score, the SSL probe's, both on the initial model,
# and the cross-entropy behind its score (the loss Flower's History shows)
LOCAL_SCORES = (
    "local-accuracy",
    "local-loss",
    "local-probe-accuracy",
    "untrained-local-accuracy",
    "untrained-local-probe-accuracy",
)
# what a fit reply's metrics put in its client's record of the round
FIT_RECORD_KEYS = (
    "partition-id",
    "bitwidth",
    "loss",
    "train-steps",
    "train-seconds",
    "torch-threads",
    "gpu-peak-mb",
    "peak-rss-mb",
    "allocator",
    "device",
    "fused-kernels",
    "ray-node",
)


def mean_of(clients: list[dict], key: str) -> float | None:
    """The mean of ``key`` over the clients that reported it (None if none did)."""
    values = [c[key] for c in clients if c.get(key) is not None]
    return float(np.mean(values)) if values else None


def row_label(algorithm: Algorithm, config: ExperimentConfig) -> str:
    """The paper's row name: ``Fed-QSSL``; ``Fed-QSSL (Full)`` when no client is low-bit;
    ``(uniform p_k)`` or ``(highest bits only)`` when Fed-QSSL's softmax weights are replaced
    by a control's; ``(clamp)``
    when full-precision models keep the clients' clamp(0, 1) instead of ReLU."""
    notes = []
    if all(b == FULL_PRECISION for b in config.bitwidths):
        notes.append("Full")
    if algorithm.server_step == "fedqssl" and config.dq_weighting != "softmax":
        notes.append(
            {"uniform": "uniform p_k", "highest-bits": "highest bits only"}[config.dq_weighting]
        )
    if config.fp_activation != "relu":
        notes.append(config.fp_activation)
    if config.bn_recalibrate != "none":
        notes.append("BN on D_g" + (", downlinks too" if config.bn_recalibrate == "all" else ""))
    return f"{algorithm.label} ({', '.join(notes)})" if notes else algorithm.label


def knn_curve(rounds: list[dict], untrained_knn: float | None) -> list[tuple[int, float]]:
    """(round, kNN %) from round 0, the initial model (the untrained floor), to the last."""
    points = [
        (r["round"], 100 * r["knn-accuracy"]) for r in rounds if r.get("knn-accuracy") is not None
    ]
    return ([(0, 100 * untrained_knn)] if untrained_knn is not None else []) + points


def client_record(metrics: Mapping[str, Any], examples: int, **measured: Any) -> dict[str, Any]:
    """One client's line in a round's record: what its reply said, and what the server measured
    (bytes each way, L_DQ, weight)."""
    return {
        **{key: metrics.get(key) for key in FIT_RECORD_KEYS},
        "examples": examples,
        **measured,
    }


# the server's phases whose optimizer steps a round records (``<phase>-steps``)
SERVER_PHASES = ("dequantize", "requantize", "finetune", "buffer")


def budget_record(clients: list[dict[str, Any]], server_steps: Mapping[str, int]) -> dict[str, Any]:
    """A round's training budget in optimizer steps: the clients' (``train-steps``, summed over
    the usable clients), the server's per phase and in all (``server-steps``)."""
    phases = {f"{phase}-steps": int(server_steps.get(phase, 0)) for phase in SERVER_PHASES}
    return {
        "train-steps": sum(int(client.get("train-steps") or 0) for client in clients),
        **phases,
        "server-steps": sum(phases.values()),
    }


def fit_record(
    clients: list[dict[str, Any]],
    left_out: list[tuple[str, str]],
    num_clients: int,
    fp32_bytes: int,
    server_seconds: Mapping[str, float],
    server_steps: Mapping[str, int],
) -> dict[str, Any]:
    """What a round's record says about fit: every usable client (``client_record``), who was
    left out and why, the partitions missing, the fp32 bytes the same clients would have sent,
    the server's seconds per step and the round's optimizer steps (``budget_record``)."""
    present = {client["partition-id"] for client in clients}
    return {
        "clients": clients,
        **budget_record(clients, server_steps),
        "failed": [who for who, _ in left_out],
        "failure-reasons": [why for _, why in left_out],
        "missing-partitions": [k for k in range(num_clients) if k not in present],
        "fp32-equivalent-bytes": fp32_bytes * len(clients),
        "server-seconds": dict(server_seconds),
    }


def round_line(record: Mapping[str, Any], num_rounds: int) -> str:
    """The one log line a completed round gets."""
    clients = record.get("clients", [])
    bits = ",".join(str(c["bitwidth"]) for c in clients)
    weights = ",".join(f"{c['weight']:.2f}" for c in clients if c["weight"] is not None)
    return (
        f"round {record['round']}/{num_rounds}: {len(clients)} clients (bits {bits}), "
        f"{len(record.get('failed', []))} failed, missing partitions "
        f"{record.get('missing-partitions', [])}, p_k [{weights}], uplink "
        f"{sum(c['uplink-bytes'] for c in clients) / 1e6:.2f} MB "
        f"(fp32 {record.get('fp32-equivalent-bytes', 0) / 1e6:.2f} MB), "
        f"kNN acc {record['knn-accuracy']:.4f}, {record['round-seconds']:.0f}s"
    )


def local_record(metrics: Mapping[str, Any], test_examples: int) -> dict[str, Any]:
    """One client's local scores after the last round."""
    return {
        "partition-id": metrics.get("partition-id"),
        "bitwidth": metrics.get("bitwidth"),
        **{key: metrics.get(key) for key in LOCAL_SCORES},
        "local-model": metrics.get("local-model", "probe"),
        "saved-model": metrics.get("saved-model"),  # the device's own copy, where it keeps it
        "test-examples": test_examples,
    }


def weighted_loss(local: list[dict]) -> float | None:
    """The clients' ``local-loss`` weighted by their test examples (Flower's distributed loss),
    None when no client reported one."""
    scored = [
        (c["local-loss"], c["test-examples"]) for c in local if c.get("local-loss") is not None
    ]
    examples = sum(n for _, n in scored)
    return sum(loss * n for loss, n in scored) / examples if examples else None


def weight_range(rounds: list[dict]) -> list[float] | None:
    """[smallest, largest] aggregation weight p_k of any client in any round (None: none)."""
    weights = [
        c["weight"] for r in rounds for c in r.get("clients", []) if c.get("weight") is not None
    ]
    return [min(weights), max(weights)] if weights else None


def run_summary(
    algorithm: Algorithm,
    config: ExperimentConfig,
    rounds: list[dict],
    local: list[dict],
    final: Mapping[str, float],
    untrained: Mapping[str, float],
    evaluation_failures: int,
    buffer_size: int,
) -> dict[str, Any]:
    """The run's summary: global and local scores beside the untrained floor, bytes, sizes."""
    means = {key.replace("local-", "mean-local-", 1): mean_of(local, key) for key in LOCAL_SCORES}
    uplink = sum(c["uplink-bytes"] for r in rounds for c in r.get("clients", []))
    fp32 = sum(r.get("fp32-equivalent-bytes", 0) for r in rounds)
    last_clients = rounds[-1].get("clients", []) if rounds else []
    mean_size = mean_of(last_clients, "examples")  # as reported, after the per-client cap
    return {
        "algorithm": algorithm.name,
        "label": row_label(algorithm, config),
        "global-accuracy": final.get("global-accuracy"),
        "mean-local-accuracy": means["mean-local-accuracy"],
        "global-probe-accuracy": final.get("global-probe-accuracy"),
        "mean-local-probe-accuracy": means["mean-local-probe-accuracy"],
        "untrained-global-accuracy": untrained.get("global-accuracy"),
        "untrained-mean-local-accuracy": means["untrained-mean-local-accuracy"],
        "untrained-global-probe-accuracy": untrained.get("global-probe-accuracy"),
        "untrained-mean-local-probe-accuracy": means["untrained-mean-local-probe-accuracy"],
        "local-accuracy": local,
        "evaluation-failures": evaluation_failures,
        "uplink-bytes": uplink,
        "fp32-equivalent-uplink-bytes": fp32,
        "uplink-ratio-to-fp32": uplink / fp32 if fp32 else None,
        "downlink-bytes": sum(
            c["downlink-bytes"] or 0 for r in rounds for c in r.get("clients", [])
        ),
        # the run's training budget in optimizer steps (every client's, the server's by phase)
        **{
            key: sum(r.get(key, 0) for r in rounds)
            for key in ("train-steps", *(f"{p}-steps" for p in SERVER_PHASES), "server-steps")
        },
        # the aggregation weights p_k every round gave (how far from 1/K the weighting moved)
        "weight-range": weight_range(rounds),
        "knn-accuracy": rounds[-1]["knn-accuracy"] if rounds else None,
        "untrained-knn-accuracy": untrained.get("knn-accuracy"),
        "rounds": len(rounds),
        # |D_g| / mean |D_k|, the paper's Figure 3b axis
        "buffer-to-client-ratio": buffer_size / mean_size if mean_size else None,
    }


def recorded_config(config: ExperimentConfig) -> dict[str, Any]:
    """The config as a run's folder records it: ``output-dir`` is ``"."``, the folder holding
    the record, so that results hold no path of the machine that wrote them (they are moved,
    and committed)."""
    return {**config.to_dict(), "output-dir": "."}


def default_output_dir() -> Path:
    """A new timestamped folder under ``results/``, created now (``-2``, ... when taken)."""
    return claim_new_folder(Path.cwd().resolve() / "results" / time.strftime("run-%Y%m%d-%H%M%S"))


class RunRecorder:
    """Writes one JSON line per round as it ends, and the summary and plots at the end; every
    round names the code that ran it (``code-hash``), the summary its ``provenance``."""

    def __init__(self, config: ExperimentConfig, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.started_at = provenance.started_now()
        self.code = provenance.code_hash(APP_ROOT)
        self.rounds: list[dict[str, Any]] = []
        # a run owns its folder's records: an earlier run's rounds or summary left there would
        # read as this run's (rounds 1, 2, 1, 2, 3; a summary of a run that then failed)
        for stale in ("rounds.jsonl", "summary.json"):
            (self.output_dir / stale).unlink(missing_ok=True)
        (self.output_dir / "config.json").write_text(
            json.dumps(recorded_config(config), indent=2) + "\n"
        )

    def resume(self, records: list[dict[str, Any]], wall_seconds: float) -> None:
        """Continue a run from its checkpoint: its rounds so far (``rounds.jsonl`` rewritten to
        exactly them, dropping any round recorded after the checkpoint) and its wall time."""
        self.rounds = list(records)
        self.started = time.perf_counter() - wall_seconds
        (self.output_dir / "rounds.jsonl").write_text(
            "".join(json.dumps(record) + "\n" for record in records), encoding="utf-8"
        )

    def elapsed(self) -> float:
        """Seconds of wall time this run has taken, earlier sessions of it included."""
        return time.perf_counter() - self.started

    def add_round(self, record: dict[str, Any]) -> None:
        """Append one round's record to ``rounds.jsonl``, with the hash of the code that ran it."""
        record = {**record, "code-hash": self.code}
        self.rounds.append(record)
        with open(self.output_dir / "rounds.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any], server: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (with the wall time and the run's provenance; ``server``: this
        process's threads, device and fused-kernel use) and the plots."""
        summary = {
            **summary,
            "wall-seconds": self.elapsed(),
            "provenance": provenance.run_provenance(
                self.code, self.started_at, server, self.rounds
            ),
        }
        # atomic: a process killed here leaves no half summary that reads as a damaged record
        write_text_atomically(
            self.output_dir / "summary.json", json.dumps(summary, indent=2) + "\n"
        )
        self._plot(summary.get("untrained-knn-accuracy"))
        return summary

    def _plot(self, untrained_knn: float | None) -> None:
        """accuracy.png: the kNN monitor from round 0 (the initial model: the untrained floor,
        also drawn as a line) on a fixed 0-100% axis, so that a small change looks small;
        bytes.png: uplink bytes per bitwidth and round beside fp32."""
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt
        from matplotlib.ticker import MaxNLocator

        points = knn_curve(self.rounds, untrained_knn)
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label="global model")
        if untrained_knn is not None:
            axis.axhline(100 * untrained_knn, linestyle="--", color="grey", label="untrained floor")
        axis.set(
            xlabel="round",
            ylabel="global kNN accuracy (%)",
            title="Global model (kNN monitor)",
            ylim=(0, 100),
        )
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.output_dir / "accuracy.png", dpi=120)
        plt.close(figure)

        trained = [r for r in self.rounds if r.get("clients")]
        bitwidths = sorted({c["bitwidth"] for r in trained for c in r["clients"]})
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for bits in bitwidths:
            axis.plot(
                [r["round"] for r in trained],
                [
                    sum(c["uplink-bytes"] for c in r["clients"] if c["bitwidth"] == bits) / 1e6
                    for r in trained
                ],
                marker="o",
                label=f"{bits}-bit uplink",
            )
        axis.plot(
            [r["round"] for r in trained],
            [r["fp32-equivalent-bytes"] / 1e6 for r in trained],
            linestyle="--",
            color="grey",
            label="fp32 equivalent",
        )
        axis.set(xlabel="round", ylabel="MB per round", title="Uplink bytes by bitwidth")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.output_dir / "bytes.png", dpi=120)
        plt.close(figure)
