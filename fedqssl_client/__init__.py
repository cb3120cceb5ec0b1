"""Fed-QSSL's client: a Flower NumPyClient that trains low-bit SimCLR and ships packed codes."""
