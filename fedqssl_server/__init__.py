"""Fed-QSSL's server: its Flower-free round steps, the ``FedQSSL`` strategy (and the baselines'),
and the ServerApp.

``from fedqssl_server import FedQSSL`` loads the strategy (and torch) on first use only, so the
package's torch-free readers (``fedqssl_server.checkpoint``) stay light."""

from __future__ import annotations

__all__ = ["FedQSSL", "strategy_for"]


def __getattr__(name: str):
    if name in __all__:
        from fedqssl_server import strategy

        return getattr(strategy, name)
    raise AttributeError(f"module 'fedqssl_server' has no attribute {name!r}")
