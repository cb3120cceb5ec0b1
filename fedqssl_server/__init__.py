"""Fed-QSSL's server: its Flower-free round steps and books, the ``FedQSSL`` strategy (which runs
the baselines too), and the ServerApp.

``from fedqssl_server import FedQSSL`` loads the strategy (and Flower and torch) on first use
only, so importing one of the package's light modules (``replies``, ``nodes``) stays light."""

from __future__ import annotations

__all__ = ["FedQSSL", "strategy_for"]


def __getattr__(name: str):
    if name in __all__:
        from fedqssl_server import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'fedqssl_server' has no attribute {name!r}")
