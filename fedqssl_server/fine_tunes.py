"""The server's fine-tunes on D_g, in this process or side by side in worker processes.

A Fed-QSSL round fine-tunes every received model (de-quantization) and one model per bitwidth
(re-quantization). Each fine-tune is independent of the others: the same views of D_g, its own
weights and optimizer. In one process they run one after another, so the server's round grows
linearly with the clients while the clients train in parallel. ``server-workers: W`` runs them
in W spawned worker processes (``FineTunes``), each with ``cores // W`` torch threads: what a
server with many cores needs, since one small model's step does not keep many threads busy.
Results come back in the order the jobs were given (the round folds them in key order, as in one
process) and at most ``2 W`` jobs are in flight, so the round still holds O(W) model states
however many clients report. The numbers are the one-process numbers up to the floating-point
order of a different thread count (tested).
"""

from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import torch

from common.config import ConfigError, ExperimentConfig
from common.learning.training import fit_batches, recipe
from common.runs.experiment import new_model, torch_device

State = dict[str, torch.Tensor]


def cpu_state(model: torch.nn.Module) -> State:
    """A model's state on the CPU: the server keeps and combines states there, whatever device
    trained them (decoded payloads arrive on the CPU)."""
    return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}


@dataclass(frozen=True)
class FineTune:
    """One server fine-tune: ``state`` trained at ``bits`` on ``views`` (epochs of batches),
    seeded by ``seed``, with the config's recipe (everything a worker process needs)."""

    config: ExperimentConfig
    channels: int
    num_classes: int
    state: Mapping[str, torch.Tensor]
    bits: int
    views: list
    seed: int
    phase: str  # what its optimizer steps count towards (dequantize, requantize, ...)


@dataclass(frozen=True)
class FineTuned:
    """A fine-tune's result: the trained state (CPU), its last epoch's loss, its steps and the
    phase they count towards."""

    state: State
    last_loss: float
    steps: int
    phase: str


def fine_tune(job: FineTune) -> FineTuned:
    """Run one fine-tune in this process.

    The server is not a low-bit device: its s-bit fine-tunes keep float32 copies for backward
    whatever ``save-codes`` says (the same numbers, tested; about 1.3x faster)."""
    model = new_model(job.config, job.bits, job.channels, job.num_classes)
    model.load_state_dict(job.state)
    server_recipe = recipe(job.config, job.bits)
    server_recipe = dataclasses.replace(
        server_recipe, settings=dataclasses.replace(server_recipe.settings, save_codes=False)
    )
    trained = fit_batches(model, job.views, server_recipe, job.seed)
    return FineTuned(cpu_state(model), trained.last_loss, trained.steps, job.phase)


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class FineTunes:
    """Runs a round's fine-tunes: in this process (``workers`` 1) or in a pool of spawned worker
    processes kept for the run (started at the first use; the strategy stops them after its
    last round)."""

    def __init__(self, config: ExperimentConfig) -> None:
        self.config = config
        self.workers = config.server_workers
        self._pool: ProcessPoolExecutor | None = None
        # refused at start, before any client trains, not at the first fine-tune
        if self.workers > 1 and torch_device(config).type != "cpu":
            raise ConfigError(
                "server-workers: worker processes run the server's fine-tunes on CPU cores; on a "
                "GPU the fine-tunes already run there one after another: set server-workers: 1"
            )

    def one(self, job: FineTune) -> FineTuned:
        """A single fine-tune, in this process: with every core its threads have."""
        return fine_tune(job)

    def map(self, jobs: Iterable[FineTune]) -> Iterator[FineTuned]:
        """Each job's result, in the jobs' order. ``jobs`` is drawn lazily: at most
        ``2 * workers`` are in flight, so a job that decodes its state when drawn keeps the
        round's memory flat in the number of jobs."""
        if self.workers == 1:
            yield from map(self.one, jobs)
            return
        pool = self._started_pool()
        pending: collections.deque[Future] = collections.deque()
        for job in jobs:
            pending.append(pool.submit(fine_tune, job))
            if len(pending) >= 2 * self.workers:
                yield self._result(pending.popleft())
        while pending:
            yield self._result(pending.popleft())

    def start(self) -> None:
        """Start every worker now (a pool spawns one per job submitted while none is idle, so
        one job would start one): their start-up, seconds each, stays out of a round."""
        if self.workers > 1:
            list(self._started_pool().map(int, range(self.workers)))

    def _started_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            threads = max(1, usable_cores() // self.workers)
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
                initargs=(threads,),
            )
        return self._pool

    def _result(self, future: Future) -> FineTuned:
        try:
            return future.result()
        except BrokenProcessPool as error:
            self.close()
            raise RuntimeError(
                "a server worker process died during a fine-tune (out of memory?): lower "
                f"server-workers (now {self.workers}) or give the server more memory"
            ) from error

    def close(self) -> None:
        """Stop the worker processes (a later ``map`` starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
