"""A round's ledger (fedqssl_server.ledger): refusals in the order found, the min-fit-clients
rule, and a record that matches what the server step said of each client by partition."""

from types import SimpleNamespace

import pytest

from fedqssl_server.ledger import RoundLedger
from fedqssl_server.rounds import ClientOutcome, RoundOutcome


def reply(partition: int, node: str, examples: int = 10) -> SimpleNamespace:
    """What intake hands the ledger for one usable reply (``intake.Accepted``'s fields)."""
    return SimpleNamespace(
        key=partition,
        client=SimpleNamespace(cid=node),
        result=SimpleNamespace(
            num_examples=examples,
            metrics={"partition-id": partition, "bitwidth": 4, "train-steps": 3},
        ),
        decode=lambda: {"partition": partition},
        uplink_bytes=100 + partition,
    )


def ledger(min_fit_clients: int = 2) -> RoundLedger:
    return RoundLedger(
        server_round=5, min_fit_clients=min_fit_clients, num_clients=4, fp32_bytes=1000
    )


def test_refusals_keep_the_order_found_and_fit_can_be_taken_again():
    books = ledger()
    books.left_out_by_sampling([("n9", "did not say which partition it is")])
    books.take([reply(1, "b")], [("n7", "lost"), ("n8", "sent a bad model")], answers=3)
    assert [who for who, _ in books.refusals] == ["n9", "n7", "n8"]
    assert books.asked == 4
    books.take([reply(1, "b"), reply(0, "a")], [], answers=2)  # a second look at fit
    assert books.refusals == [("n9", "did not say which partition it is")]
    assert list(books.accepted) == [1, 0] and books.examples() == {1: 10, 0: 10}
    assert books.decoders()[0]() == {"partition": 0}


def test_shortfall_names_the_round_the_counts_and_the_first_failure():
    books = ledger(min_fit_clients=2)
    books.take([reply(0, "a")], [("n7", "ValueError: node lost")], answers=2)
    assert books.shortfall() == (
        "round 5: 1 of 2 clients returned a usable model, fewer than min-fit-clients (2); "
        "first failure: ValueError: node lost"
    )
    books.take([reply(0, "a"), reply(2, "c")], [], answers=2)
    assert books.shortfall() is None
    books.drop({2: "client 2: de-quantization loss nan on D_g, refused"})
    assert list(books.accepted) == [0] and books.refusals[-1][0] == "c"
    assert "first failure: client 2: de-quantization loss nan" in books.shortfall()
    assert "none reported" in RoundLedger(1, 1, 1, 1).shortfall()


def test_the_record_matches_each_clients_outcome_by_partition_not_position():
    books = ledger(min_fit_clients=1)
    books.sent_bytes = {"a": 50, "c": 70}
    books.take([reply(2, "c"), reply(0, "a")], [("n7", "lost")], answers=3)  # arrival order
    outcome = RoundOutcome(
        global_state={},
        clients={0: ClientOutcome(0.25, 4.0, 6), 2: ClientOutcome(0.75, 3.0, 6)},
        steps={"dequantize": 12, "requantize": 6},
        seconds={"dequantize": 1.5},
    )
    books.close_fit(outcome)
    clients = books.fit["clients"]
    assert [c["partition-id"] for c in clients] == [0, 2]
    assert [(c["weight"], c["dq-loss"]) for c in clients] == [(0.25, 4.0), (0.75, 3.0)]
    assert [c["uplink-bytes"] for c in clients] == [100, 102]
    assert [c["downlink-bytes"] for c in clients] == [50, 70]
    assert books.fit["missing-partitions"] == [1, 3]
    assert books.fit["failed"] == ["n7"] and books.fit["failure-reasons"] == ["lost"]
    assert books.fit["train-steps"] == 6 and books.fit["server-steps"] == 18
    assert books.fit["fp32-equivalent-bytes"] == 2000
    record = books.record(**{"knn-accuracy": 0.5})
    assert record["round"] == 5 and record["knn-accuracy"] == 0.5
    assert record["round-seconds"] >= 0 and record["clients"] == clients


def test_a_failed_round_records_its_clients_without_server_measures():
    books = ledger()
    books.take([reply(0, "a")], [], answers=1)
    books.close_fit(None)
    (client,) = books.fit["clients"]
    assert client["weight"] is None and client["dq-loss"] is None
    assert books.fit["server-steps"] == 0
    with pytest.raises(KeyError):  # an outcome must speak for every client the ledger kept
        books.close_fit(RoundOutcome(global_state={}, clients={}))
