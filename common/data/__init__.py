"""Datasets held in memory (``datasets``), Fed-QSSL's partition of them (``partition``) and a
device's own images (``local``). Free of Flower."""
