"""One round's ledger: the one owner of what a round took in, what it refused and what it records.

A round hears from its clients in three places (sampling, Flower's results and failures, the
server step's own refusals); each refusal lands here as (who, why), in the order found. The
usable replies are kept by partition, so what the server step says of a client (its L_DQ, its
weight) is matched by partition, never by position. ``shortfall`` is the ``min-fit-clients``
rule; ``record`` is the round's line of ``rounds.jsonl``, built here only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedqssl_server.results import client_record, fit_record
from fedqssl_server.rounds import RoundOutcome

if TYPE_CHECKING:  # the ledger itself stays free of Flower: replies reach it as intake made them
    from fedqssl_server.intake import Accepted


@dataclass
class RoundLedger:
    """The books of round ``server_round``, opened by ``configure_fit``."""

    server_round: int
    min_fit_clients: int
    num_clients: int
    fp32_bytes: int  # one client's model at full precision: what the uplink is compared with
    started: float = field(default_factory=time.perf_counter)
    sent_bytes: dict[str, int] = field(default_factory=dict)  # node -> downlink bytes
    before_fit: list[tuple[str, str]] = field(default_factory=list)  # left out by sampling
    refusals: list[tuple[str, str]] = field(default_factory=list)  # (who, why), in order found
    accepted: dict[int, Accepted] = field(default_factory=dict)  # partition -> usable reply
    asked: int = 0  # clients the round counted on: sampled, and those left out before fit
    fit: dict[str, Any] = field(default_factory=dict)  # what fit adds to the record

    def left_out_by_sampling(self, left_out: list[tuple[str, str]]) -> None:
        """Who was left out before fit (``configure_fit``), and why."""
        self.before_fit = list(left_out)
        self.refusals = list(left_out)

    def take(self, accepted: list[Accepted], refused: list[tuple[str, str]], answers: int) -> None:
        """Fit's outcome: the usable replies (one per partition), the refused replies and
        failures as (who, why), out of ``answers`` replies and failures in all."""
        self.accepted = {item.key: item for item in accepted}
        self.refusals = [*self.before_fit, *refused]
        self.asked = answers + len(self.before_fit)

    def drop(self, refused: Mapping[int, str]) -> None:
        """Refuse the partitions the server step refused, with its reasons."""
        for partition, why in refused.items():
            self.refusals.append((self.accepted.pop(partition).client.cid, why))

    def decoders(self) -> dict[int, Callable[[], dict]]:
        """Each usable reply's model, to be decoded when the server step reaches it."""
        return {key: item.decode for key, item in self.accepted.items()}

    def examples(self) -> dict[int, int]:
        """Each usable reply's number of training examples."""
        return {key: item.result.num_examples for key, item in self.accepted.items()}

    def shortfall(self) -> str | None:
        """Why the round cannot go on (fewer usable models than ``min-fit-clients``), or None."""
        if len(self.accepted) >= self.min_fit_clients:
            return None
        first = self.refusals[0][1] if self.refusals else "none reported"
        return (
            f"round {self.server_round}: {len(self.accepted)} of {self.asked} clients returned a "
            f"usable model, fewer than min-fit-clients ({self.min_fit_clients}); first failure: "
            f"{first}"
        )

    def close_fit(self, outcome: RoundOutcome | None) -> None:
        """What fit adds to the round's record (``results.fit_record``): every usable client,
        in partition order, with what the server measured of it (bytes each way, and from
        ``outcome``, when the server step ran, its L_DQ, steps and weight)."""
        clients = []
        for key in sorted(self.accepted):
            item = self.accepted[key]
            measured = None if outcome is None else outcome.clients[key]
            clients.append(
                client_record(
                    item.result.metrics,
                    item.result.num_examples,
                    **{
                        "uplink-bytes": item.uplink_bytes,
                        "downlink-bytes": self.sent_bytes.get(item.client.cid),
                        "dq-loss": None if measured is None else measured.dq_loss,
                        "dequantize-steps": None if measured is None else measured.dq_steps,
                        "weight": None if measured is None else measured.weight,
                    },
                )
            )
        self.fit = fit_record(
            clients,
            self.refusals,
            self.num_clients,
            self.fp32_bytes,
            {} if outcome is None else outcome.seconds,
            {} if outcome is None else outcome.steps,
        )

    def record(self, **values: Any) -> dict[str, Any]:
        """The round's record for ``rounds.jsonl``: what fit gathered, ``values``, its seconds."""
        return {
            **self.fit,
            "round": self.server_round,
            **values,
            "round-seconds": time.perf_counter() - self.started,
        }
