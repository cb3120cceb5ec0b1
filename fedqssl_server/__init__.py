"""Fed-QSSL's server: its Flower-free round steps, the ``FedQSSL`` strategy (and the baselines'),
and the ServerApp."""

from fedqssl_server.strategy import FedQSSL, strategy_for

__all__ = ["FedQSSL", "strategy_for"]
