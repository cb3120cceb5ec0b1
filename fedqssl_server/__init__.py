"""Fed-QSSL's server: its Flower-free steps, the FedQSSL strategy and the ServerApp."""
