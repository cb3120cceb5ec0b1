"""Low-bit arithmetic: the quantizers (``quantizers``), the quantized layers and model walkers
(``layers``), codes saved for backward (``saved_codes``), QSGD (``qsgd``) and the BitOps/memory
counter (``bitops``). Free of Flower."""
