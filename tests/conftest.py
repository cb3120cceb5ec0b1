"""Test-session settings: torch computes on one thread in the test process.

On a 2-core machine that is busy (CI beside other work, a simulation beside the tests), torch's
default of one thread per core makes every small op wait for a thread that is not scheduled: an
in-process federation measured 180 s with 2 threads under load and 22 s with 1. The processes
that tests start (Flower's SuperLink, ServerApp and Ray actors) keep their own settings.
"""

import torch

torch.set_num_threads(1)
