"""BatchNorm statistics re-estimated on D_g (``bn-recalibrate``): what the statistics become,
that nothing else changes, and where the server round applies it."""

import json
from pathlib import Path

import pytest
import torch
from helpers import federate, tiny_config

from common.algorithms import get_algorithm
from common.config import ConfigError, ExperimentConfig
from common.learning.batchnorm import recalibrate_batchnorm
from common.learning.models import build_ssl_model
from common.runs.experiment import server_data
from common.runs.plan import algorithm_row
from fedqssl_server.results import row_label
from fedqssl_server.rounds import server_round_for


def test_running_statistics_become_the_data_sets_and_nothing_else_changes():
    model = build_ssl_model("small_cnn", 32, in_channels=1, width=4, projection_dim=8)
    first_norm = model.encoder.features[1]
    assert isinstance(first_norm, torch.nn.BatchNorm2d)
    inputs = []
    first_norm.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(70, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 + 1
    assert recalibrate_batchnorm(model, images, batch_size=32) == 2  # the partial batch dropped
    seen = torch.cat(inputs)  # what the norm saw: the two full batches' conv outputs
    assert len(seen) == 64
    means = torch.stack([batch.mean(dim=(0, 2, 3)) for batch in inputs])
    variances = torch.stack([batch.var(dim=(0, 2, 3), unbiased=True) for batch in inputs])
    assert torch.allclose(first_norm.running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(first_norm.running_var, variances.mean(0), atol=1e-5)
    assert first_norm.momentum == 0.1 and model.training  # restored
    for name, tensor in model.state_dict().items():
        if "running" in name or "num_batches" in name:
            continue
        assert torch.equal(tensor, before[name]), name  # weights, gamma and beta untouched
    assert not torch.equal(first_norm.running_mean, before["encoder.features.1.running_mean"])


def test_nothing_to_recalibrate_on_fewer_than_two_images():
    model = build_ssl_model("small_cnn", 32, in_channels=1, width=4, projection_dim=8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate_batchnorm(model, torch.randn(1, 1, 28, 28), batch_size=32) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("mode", ["global", "all"])
def test_the_round_recalibrates_the_average_and_optionally_each_downlink(tmp_path, mode):
    plain = tiny_config(tmp_path / "plain", "fedsimclr")
    config = tiny_config(tmp_path / mode, "fedsimclr", **{"bn-recalibrate": mode})
    server, reference = (server_round_for(c, server_data(c)) for c in (config, plain))
    base = server.initial_state()
    shifted = {k: v + 0.05 if v.is_floating_point() else v for k, v in base.items()}
    states = {0: base, 1: shifted}
    outcome = server.run(1, base, states, {0: 30, 1: 10}, {4, 8})
    average = reference.run(1, base, states, {0: 30, 1: 10}, {4, 8}).global_state
    assert torch.equal(
        outcome.global_state["encoder.features.0.weight"], average["encoder.features.0.weight"]
    )
    expected = server.recalibrated(average, 32)
    for name in ("encoder.features.1.running_mean", "encoder.features.1.running_var"):
        assert torch.equal(outcome.global_state[name], expected[name])
        assert not torch.equal(outcome.global_state[name], average[name])
    for bits in (4, 8):
        downlink = outcome.requantized[bits]
        if mode == "global":
            assert downlink is outcome.global_state  # the codec rounds it, as without the key
        else:
            again = server.recalibrated(outcome.global_state, bits)
            assert torch.equal(
                downlink["encoder.features.1.running_var"], again["encoder.features.1.running_var"]
            )
            assert not torch.equal(
                downlink["encoder.features.1.running_var"],
                outcome.global_state["encoder.features.1.running_var"],
            )


def test_a_run_with_recalibration_federates_and_says_so(tmp_path):
    config = tiny_config(tmp_path, "fedqssl", **{"bn-recalibrate": "all"})
    strategy, _ = federate(config)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert summary["label"] == "Fed-QSSL (BN on D_g, downlinks too)"
    for name, tensor in strategy.global_state.items():
        assert not name.endswith("running_var") or (tensor >= 0).all(), name


def test_the_key_its_rows_and_labels():
    with pytest.raises(ConfigError, match="bn-recalibrate: 'yes' is not one of none, global, all"):
        ExperimentConfig.from_mapping({"bn-recalibrate": "yes"})
    assert algorithm_row("fedsimclr-bn") == {"algorithm": "fedsimclr", "bn-recalibrate": "global"}
    assert algorithm_row("fedqssl-bnall")["bn-recalibrate"] == "all"
    config = ExperimentConfig.from_mapping({"bn-recalibrate": "global"})
    assert row_label(get_algorithm("fedsimclr"), config) == "Fed-SimCLR (BN on D_g)"
