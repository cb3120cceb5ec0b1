"""Experiments as runs: what a run needs from its config (``experiment``), plans of runs
(``plan``), their reports (``report``, ``plan_report``), the models a run keeps
(``saved_models``), and the Flower launcher of ``simulation.py`` (``launcher``, ``superlink``)."""
