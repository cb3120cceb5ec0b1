"""Stand-ins for Flower's client proxies and client manager, and clients' fit results: drive a
strategy without Flower."""

from pathlib import Path

import torch
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    GetPropertiesRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from common.runs.experiment import new_model
from common.wire.payload import encode_state


class FakeProxy:
    """A node: ``properties`` is what it answers when the server asks who it is."""

    def __init__(self, cid, properties=None):
        self.cid = cid
        self.properties = properties
        self.asked = 0

    def get_properties(self, ins, timeout, group_id):
        self.asked += 1
        if self.properties is None:
            raise RuntimeError(f"node {self.cid} does not answer")
        return GetPropertiesRes(Status(Code.OK, ""), dict(self.properties))


class FakeManager:
    def __init__(self, proxies):
        self.proxies = proxies

    def num_available(self):
        return len(self.proxies)

    def sample(self, num_clients, min_num_clients=None):
        return self.proxies[:num_clients]

    def wait_for(self, num_clients, timeout=0):
        return len(self.proxies) >= num_clients

    def all(self):
        return {proxy.cid: proxy for proxy in self.proxies}


def drive(strategy, clients, manager, rounds, evaluate_at_end=True):
    """Run ``rounds`` Flower rounds (numbered 1.., as Flower numbers them) of ``strategy`` with
    in-process ``clients`` (node id -> NumPyClient), then the final federated evaluation."""
    strategy.evaluate(0, None)
    for server_round in range(1, rounds + 1):
        results = []
        for proxy, ins in strategy.configure_fit(server_round, None, manager):
            arrays, count, metrics = clients[proxy.cid].fit(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            results.append(
                (proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), count, metrics))
            )
        strategy.aggregate_fit(server_round, results, [])
        strategy.evaluate(server_round, None)
    if not evaluate_at_end:
        return
    evaluations = []
    for proxy, ins in strategy.configure_evaluate(rounds, None, manager):
        loss, count, metrics = clients[proxy.cid].evaluate(
            parameters_to_ndarrays(ins.parameters), ins.config
        )
        evaluations.append((proxy, EvaluateRes(Status(Code.OK, ""), loss, count, metrics)))
    strategy.aggregate_evaluate(rounds, evaluations, [])


def fit_result(config, bits, seed, partition_id=0):
    """A client's fit reply: the initial model, perturbed by ``seed``, encoded at ``bits``."""
    model = new_model(config, bits, 1, 10)  # seeds torch with config.seed: reseed after it
    torch.manual_seed(seed)
    for parameter in model.parameters():  # make every client's model different
        parameter.data.add_(0.01 * torch.randn_like(parameter))
    payload = encode_state(model.state_dict(), bits)
    metrics = {"bitwidth": bits, "partition-id": partition_id, "loss": 1.0}
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(payload), 10, metrics)


def three_results(config, proxies):
    """Fit results of three clients at 4, 8 and 4 bits."""
    return [
        (proxy, fit_result(config, bits, index, index))
        for index, (proxy, bits) in enumerate(zip(proxies, (4, 8, 4), strict=True))
    ]


def config_dir(config):
    """The run's output folder."""
    return Path(config.output_dir)
