"""One server round of every algorithm (fedqssl_server.rounds), driven with decoded states: the
paper's steps, order independence, one received state held at a time, refusals."""

import dataclasses
import gc
import subprocess
import sys
import weakref

import numpy as np
import pytest
import torch
from core_helpers import losses_of, weights_of
from flower_fakes import config_dir, fit_result
from flwr.common import (
    parameters_to_ndarrays,
)
from reference_math import average_states, softmax_weights

from common import seeds
from common.config import ExperimentConfig
from common.learning.training import fit_batches, fit_local, recipe
from common.runs.experiment import new_model, server_data
from common.vocabulary import FULL_PRECISION
from common.wire.payload import decode_state
from fedqssl_server import fine_tunes, rounds
from fedqssl_server.results import RunRecorder
from fedqssl_server.strategy import strategy_for


def test_server_rounds_load_neither_flower_nor_the_codec():
    """The round's steps take and return states: Flower and the wire stay in the strategy. A
    fresh interpreter that imports the steps has neither loaded."""
    probe = (
        "import sys; import fedqssl_server.rounds, fedqssl_server.aggregation, "
        "fedqssl_server.monitor, fedqssl_server.ledger; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr'}), "
        "'common.wire.payload' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=300
    )
    assert completed.stdout.split() == ["[]", "False"], completed.stdout


def test_round_outcome_does_not_depend_on_arrival_order(config):
    strategy = strategy_for(config, server_data(config), RunRecorder(config, config_dir(config)))
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(config, bits, key, key).parameters))
        for key, bits in enumerate((4, 8, 4))
    }
    examples = dict.fromkeys(states, 10)
    current = strategy.global_state
    forward = strategy.steps.run(1, current, states, examples, {4, 8})
    backward = strategy.steps.run(1, current, dict(reversed(states.items())), examples, {4, 8})
    assert weights_of(forward) == weights_of(backward)
    assert all(
        torch.equal(forward.global_state[k], backward.global_state[k]) for k in forward.global_state
    )
    assert all(
        torch.equal(forward.requantized[4][k], backward.requantized[4][k])
        for k in forward.requantized[4]
    )


def test_identical_models_get_identical_dq_losses_and_weights(config):
    """Every client's de-quantization sees the same views of D_g in the same order, so L_DQ
    compares models, not augmentation luck."""
    server = rounds.server_round_for(config, server_data(config))
    same = decode_state(parameters_to_ndarrays(fit_result(config, 4, 0).parameters))
    other = decode_state(parameters_to_ndarrays(fit_result(config, 4, 1).parameters))
    outcome = server.run(
        1, server.initial_state(), {0: same, 1: same, 2: other}, dict.fromkeys(range(3), 10), {4}
    )
    first, second, third = losses_of(outcome)
    assert first == second and first != third
    assert weights_of(outcome)[0] == weights_of(outcome)[1]
    assert np.allclose(weights_of(outcome), softmax_weights(losses_of(outcome)))


def initial(config):
    return rounds.server_round_for(config, server_data(config)).initial_state()


def test_server_fine_tunes_keep_float32_for_backward_whatever_save_codes_says(config, monkeypatch):
    """The server is not a low-bit device: its s-bit re-quantization never takes the slower
    codes-saving path, and its result is what the codes path gives (bit for bit)."""
    assert config.save_codes  # the default: clients save codes
    server = rounds.server_round_for(config, server_data(config))
    state = decode_state(parameters_to_ndarrays(fit_result(config, 4, 0).parameters))
    fast = server.requantize(1, state, {4})[4]
    entered = []
    monkeypatch.setattr(
        "common.learning.training.saving_codes",
        lambda: entered.append(1) or pytest.fail("codes path"),
    )
    server.requantize(1, state, {4})
    assert not entered
    monkeypatch.undo()
    model = new_model(config, 4, 1, 10)
    model.load_state_dict(state)
    seed = seeds.requantize_seed(config.seed, 1, 4)  # the seed requantize gives 4 bits in round 1
    fit_batches(
        model, server.views_of_buffer(config.requantize_epochs, seed), recipe(config, 4), seed
    )
    assert all(torch.equal(fast[k], v.cpu()) for k, v in model.state_dict().items())


def test_uniform_dq_weighting_drops_only_the_softmax(tmp_path, config):
    uniform = ExperimentConfig.from_mapping({**config.to_run_config(), "dq-weighting": "uniform"})
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(config, 4, key).parameters))
        for key in range(3)
    }
    outcomes = [
        rounds.server_round_for(c, server_data(c)).run(
            1,
            rounds.server_round_for(c, server_data(c)).initial_state(),
            states,
            dict.fromkeys(states, 10),
            {4},
        )
        for c in (config, uniform)
    ]
    softmax, flat = outcomes
    assert weights_of(flat) == pytest.approx([1 / 3] * 3)
    assert losses_of(flat) == losses_of(softmax)  # same de-quantization, other weights
    assert not np.allclose(weights_of(softmax), weights_of(flat))


def test_highest_bits_weighting_averages_only_the_highest_bit_models(config):
    """The control for a sharp softmax: p_k = 0 for every model below the highest bitwidth
    received (kept, weighted 0, not refused), uniform over those at it; without one of them in
    the round, the highest bitwidth there is."""
    control = ExperimentConfig.from_mapping(
        {**config.to_run_config(), "dq-weighting": "highest-bits"}
    )
    assert control.bitwidths == (4, 8, 4)
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(config, bits, key).parameters))
        for key, bits in enumerate(control.bitwidths)
    }

    def run(keys):
        server = rounds.server_round_for(control, server_data(control))
        chosen = {key: states[key] for key in keys}
        return server.run(1, server.initial_state(), chosen, dict.fromkeys(keys, 10), {4, 8})

    everyone, alone, low_only = run([0, 1, 2]), run([1]), run([0, 2])
    assert weights_of(everyone) == [0.0, 1.0, 0.0] and not everyone.refused
    for name, tensor in alone.global_state.items():  # the 8-bit model's own de-quantization
        assert torch.equal(everyone.global_state[name], tensor), name
    assert weights_of(low_only) == pytest.approx([0.5, 0.5])


def test_finetune_control_averages_by_samples_then_trains_the_average_on_the_buffer(
    config, monkeypatch
):
    control = ExperimentConfig.from_mapping({**config.to_run_config(), "algorithm": "fedsimclr-ft"})
    server = rounds.server_round_for(control, server_data(control))
    assert type(server) is rounds.FineTuneRound
    calls = []
    fine_tune = fine_tunes.fine_tune

    def recording(job):
        calls.append((job.bits, len(job.views), job.phase))
        return fine_tune(job)

    monkeypatch.setattr(fine_tunes, "fine_tune", recording)
    states = {
        key: decode_state(parameters_to_ndarrays(fit_result(control, 4, key).parameters))
        for key in range(3)
    }
    outcome = server.run(1, server.initial_state(), states, {0: 10, 1: 10, 2: 20}, {4, 8})
    assert weights_of(outcome) == pytest.approx([0.25, 0.25, 0.5], abs=1e-15)
    # one full-precision fine-tune of the average (not one per client), then one per bitwidth
    assert calls == [
        (32, control.dequantize_epochs, "finetune"),
        (4, control.requantize_epochs, "requantize"),
        (8, control.requantize_epochs, "requantize"),
    ]
    average = average_states([states[k] for k in range(3)], weights_of(outcome))
    name = next(k for k, v in average.items() if v.is_floating_point() and v.ndim >= 2)
    assert not torch.allclose(outcome.global_state[name], average[name])  # trained on D_g
    assert sorted(outcome.requantized) == [4, 8] and losses_of(outcome) == [None] * 3


def received_states(config, count=3):
    return {
        key: decode_state(parameters_to_ndarrays(fit_result(config, 4, key, key).parameters))
        for key in range(count)
    }


def test_streamed_round_equals_dequantizing_every_model_then_averaging(config):
    """Today's result before streaming, rebuilt from the paper's steps: each model fine-tuned in
    full precision on D_g (same seed for all), p = softmax(-L_DQ), weighted average."""
    data = server_data(config)
    server = rounds.server_round_for(config, data)
    states = received_states(config)
    outcome = server.run(7, server.initial_state(), states, dict.fromkeys(states, 10), {4})
    seed = server.round_seed(7)
    dequantized, losses = [], []
    for key in sorted(states):
        model = server.new_model(FULL_PRECISION)
        model.load_state_dict(states[key])
        trained = fit_local(
            model,
            data.buffer,
            data.spec.augmentation(config.augmentation),
            dataclasses.replace(recipe(config, FULL_PRECISION), epochs=config.dequantize_epochs),
            seed,
        )
        dequantized.append({k: v.detach() for k, v in model.state_dict().items()})
        losses.append(trained.last_loss)
    weights = softmax_weights(losses, config.dq_temperature)
    expected = average_states(dequantized, weights)
    assert losses_of(outcome) == losses
    assert np.allclose(weights_of(outcome), weights)
    for name, tensor in expected.items():
        torch.testing.assert_close(outcome.global_state[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_server_holds_one_received_state_at_a_time(config):
    server = rounds.server_round_for(config, server_data(config))
    states = received_states(config, count=4)
    alive: list[weakref.ref] = []

    def decoder(key):
        def decode():
            gc.collect()
            assert all(ref() is None for ref in alive), "an earlier received state is still held"
            state = {name: tensor.clone() for name, tensor in states[key].items()}
            alive.append(weakref.ref(next(iter(state.values()))))
            return state

        return decode

    received = {key: decoder(key) for key in states}
    outcome = server.run(1, server.initial_state(), received, dict.fromkeys(states, 10), {4})
    assert list(outcome.clients) == [0, 1, 2, 3] and len(alive) == 4


def test_a_model_that_diverges_on_the_buffer_is_refused_and_the_round_goes_on(config):
    """A model whose de-quantization loss is not finite (BatchNorm weights of 3e38: the strategy
    refuses those values before, the server step refuses their L_DQ too) does not end the round:
    it is refused, and the round equals the round without it."""
    server = rounds.server_round_for(config, server_data(config))
    states = received_states(config)
    poisoned = dict(states[2])
    for name in poisoned:
        if name.endswith("weight") and poisoned[name].dim() == 1:  # every BatchNorm scale
            poisoned[name] = torch.full_like(poisoned[name], 3e38)
    initial = server.initial_state()
    with_bad = server.run(1, initial, {**states, 2: poisoned}, dict.fromkeys(states, 10), {4})
    del states[2]
    without = server.run(1, initial, states, dict.fromkeys(states, 10), {4})
    assert list(with_bad.clients) == list(without.clients) == [0, 1]
    assert "de-quantization loss" in with_bad.refused[2]
    for name, tensor in without.global_state.items():
        assert torch.isfinite(with_bad.global_state[name].float()).all()
        torch.testing.assert_close(with_bad.global_state[name], tensor)
