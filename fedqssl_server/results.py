"""A run's output folder: resolved config, ``rounds.jsonl``, ``summary.json`` and PNG plots."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.config import ExperimentConfig


def default_output_dir() -> Path:
    return Path.cwd().resolve() / "results" / time.strftime("run-%Y%m%d-%H%M%S")


class RunRecorder:
    """Writes one JSON line per round as it ends, and the summary and plots at the end."""

    def __init__(self, config: ExperimentConfig, output_dir: Path) -> None:
        self.output_dir = output_dir
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.rounds: list[dict[str, Any]] = []
        # a run owns its folder's records: an earlier run's rounds or summary left there would
        # read as this run's (rounds 1, 2, 1, 2, 3; a summary of a run that then failed)
        for stale in ("rounds.jsonl", "summary.json"):
            (self.output_dir / stale).unlink(missing_ok=True)
        (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")

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
        self.rounds.append(record)
        with open(self.output_dir / "rounds.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        summary = {**summary, "wall-seconds": self.elapsed()}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._plot()
        return summary

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        rounds = [r for r in self.rounds if r.get("knn-accuracy") is not None]
        figure, axis = plt.subplots(figsize=(5, 3.5))
        axis.plot([r["round"] for r in rounds], [r["knn-accuracy"] for r in rounds], marker="o")
        axis.set(xlabel="round", ylabel="global kNN accuracy", title="Global model (kNN monitor)")
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
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(self.output_dir / "bytes.png", dpi=120)
        plt.close(figure)
