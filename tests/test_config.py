"""The experiment config: defaults, Flower run-config strings, YAML, and every rejection."""

import dataclasses
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, ExperimentConfig

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_cpu_quickstart_and_survive_the_run_config_round_trip():
    config = ExperimentConfig()
    assert config.bitwidths == (4, 6, 8, 12)
    run_config = config.to_run_config()
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert run_config["bitwidths"] == "4,6,8,12"
    assert ExperimentConfig.from_mapping(run_config) == config


def test_one_source_of_defaults_pyproject_quickstart_and_the_dataclass_agree():
    """``flwr run .`` reads ``[tool.flwr.app.config]``, ``simulation.py`` the quickstart preset,
    library users the dataclass: all three must be the same run, key for key."""
    with open(ROOT / "pyproject.toml", "rb") as handle:
        flower = tomllib.load(handle)["tool"]["flwr"]["app"]["config"]
    defaults = ExperimentConfig().to_run_config()
    assert flower == defaults  # every key present, every value equal (and of the same type)
    assert ExperimentConfig.from_yaml(ROOT / "configs" / "quickstart.yaml") == ExperimentConfig()


def test_flower_style_strings_are_parsed():
    config = ExperimentConfig.from_mapping(
        {
            "num-clients": "3",
            "bitwidths": "4, 8,32",
            "dirichlet-beta": "0.5",
            "balanced-partition": "true",
            "seed": 3,
        }
    )
    assert config.num_clients == 3 and config.bitwidths == (4, 8, 32)
    assert config.dirichlet_beta == 0.5 and config.balanced_partition is True


def test_yaml_accepts_lists_and_snake_case(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("num_clients: 2\nbitwidths: [6, 12]\nmodel: resnet18\ndataset: cifar10\n")
    config = ExperimentConfig.from_yaml(path)
    assert config.bitwidths == (6, 12) and config.model == "resnet18"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        ExperimentConfig.from_yaml(path)


def test_single_bitwidth_is_broadcast_to_all_clients():
    assert ExperimentConfig.from_mapping({"bitwidths": "8", "num-clients": 4}).bitwidths == (8,) * 4


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bitwidths": "0,4,4,4,4,4,4,4,4,4"}, r"bitwidths: bitwidth 0 .* 2\.\.16 or 32"),
        ({"bitwidths": "33"}, r"bitwidths: bitwidth 33"),
        ({"bitwidths": "4,4"}, r"bitwidths: 2 values for 4 clients"),
        ({"bitwidths": "4,x"}, r"bitwidths must be a comma-separated list"),
        ({"dirichlet-beta": 0}, r"dirichlet-beta: must be > 0"),
        ({"dirichlet-beta": -1.5}, r"dirichlet-beta: must be > 0"),
        ({"buffer-ratio": 0}, r"buffer-ratio: must be in \(0, 1\)"),
        ({"buffer-ratio": 1.0}, r"buffer-ratio: must be in \(0, 1\)"),
        ({"dataset": "mnist"}, r"dataset: 'mnist' is not one of fashion-mnist, cifar10"),
        ({"model": "vgg"}, r"model: 'vgg' is not one of resnet18, small_cnn"),
        ({"weight-update": "exact"}, r"weight-update: 'exact' is not one of latent, grid"),
        ({"augmentation": "gpu"}, r"augmentation: 'gpu' is not one of batched, per-image"),
        ({"fp-activation": "tanh"}, r"fp-activation: 'tanh' is not one of relu, clamp"),
        ({"learning-rate": float("inf")}, r"learning-rate must be a finite number, got inf"),
        ({"learning-rate": float("nan")}, r"learning-rate must be a finite number"),
        ({"seed": "1e30"}, r"seed: must be in \[0, 2\*\*31\)"),
        ({"batch-size": 1}, r"batch-size: must be >= 2"),
        ({"bitwidths": {"a": 4}}, r"bitwidths must be a comma-separated list"),
        ({"num-rounds": 2, "num_rounds": 3}, r"config key 'num-rounds' is given twice"),
        ({"num-clients": "many"}, r"num-clients must be an integer"),
        ({"num-clients": 2.5}, r"num-clients must be an integer"),
        ({"download": "maybe"}, r"download must be true or false"),
        ({"fraction-fit": 0}, r"fraction-fit: must be in \(0, 1\]"),
        ({"min-fit-clients": 5}, r"min-fit-clients: 5 exceeds num-clients 4"),
        ({"num-rounds": 0}, r"num-rounds: must be >= 1"),
        ({"modle": "small_cnn"}, r"unknown config key 'modle'; did you mean 'model'\?"),
    ],
)
def test_invalid_values_name_the_key_and_what_is_allowed(values, message):
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_mapping(values)


def test_a_yaml_key_given_twice_is_refused_with_its_line(tmp_path):
    preset = tmp_path / "twice.yaml"
    preset.write_text("num-rounds: 2\nseed: 0\nnum-rounds: 5\n")
    with pytest.raises(ConfigError, match=r"'num-rounds' is given twice \(line 3\)"):
        ExperimentConfig.from_yaml(preset)


def test_yaml_infinity_is_refused_as_not_finite(tmp_path):
    preset = tmp_path / "inf.yaml"
    preset.write_text("learning-rate: .inf\n")
    with pytest.raises(ConfigError, match="learning-rate must be a finite number"):
        ExperimentConfig.from_yaml(preset)


def test_every_key_has_a_description_and_the_configuration_page_is_generated():
    """docs/configuration.md's key table is ``ExperimentConfig``'s fields, generated: a key
    without a description, or a page edited by hand, fails here."""
    from common import config_reference

    for field in dataclasses.fields(ExperimentConfig):
        assert len(field.metadata.get("doc", "")) > 10, field.name
    page = config_reference.PAGE.read_text()
    assert config_reference.rewritten(page) == page, "run `python -m common.config_reference`"
    table = config_reference.key_table()
    defaults = ExperimentConfig().to_run_config()
    for key, value in defaults.items():
        shown = str(value).lower() if isinstance(value, bool) else str(value)
        assert f"| `{key}` | `{shown}` |" in table, key
    assert "fedqssl, fedsimclr, fedsimclr-ft, buffer-only, local-only" in table  # from ALGORITHMS


def test_reading_a_config_loads_no_torch():
    """The config sits at the bottom of the house, over a torch-free vocabulary: the checkpoint
    reader and the plan/report side of ``simulation.py`` validate configs without torch."""
    modules = "common.config, common.runs.plan, common.runs.plan_report, common.runs.checkpoint"
    probe = f"import sys, {modules}; print('torch' in sys.modules)"
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert completed.stdout.strip() == "False", completed.stderr


def test_tf32_is_off_unless_asked_wherever_the_device_is_chosen():
    """cuDNN runs convolutions in TF32 by default: a 12-bit activation's 4,096 levels would
    become about 3,000 values inside a conv. The device choice sets both switches."""
    import torch

    from common.runs.experiment import torch_device

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default
        torch_device(ExperimentConfig())
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        torch_device(ExperimentConfig.from_mapping({"tf32": True}))
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
