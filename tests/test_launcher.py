"""The launcher behind simulation.py (common.runs.launcher): the run config Flower reads, where a
plan's results go, what is refused before Flower starts, and the order runs take."""

import json
import socket
import tomllib
from pathlib import Path

import pytest

from common.config import ConfigError, ExperimentConfig
from common.runs import launcher
from common.runs.checkpoint import ResumePoint
from common.runs.plan import make_plan
from common.runs.superlink import free_port

TINY = "dataset: synthetic\nnum-clients: 2\nbitwidths: [4, 8]\nnum-rounds: 1\n"


def plan_in(tmp_path: Path, text: str = TINY, compare: str | None = None):
    preset = tmp_path / "tiny.yaml"
    preset.write_text(text)
    return make_plan(preset, [], compare, None, None)


def test_the_run_config_file_reads_back_as_the_config_flower_gets():
    config = ExperimentConfig.from_mapping({"bitwidths": "2", "data-dir": 'a "quoted" dir'})
    values = config.to_run_config()
    assert tomllib.loads(launcher.run_config_toml(values)) == values
    assert launcher.toml_value(True) == "true" and launcher.toml_value(0.5) == "0.5"


def test_flower_runs_offline_in_its_own_home_with_this_python_first(tmp_path):
    env = launcher.flower_env(tmp_path / "home")
    assert env["FLWR_HOME"] == str(tmp_path / "home")
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(":")[0] == str(Path(launcher.sys.executable).parent)


def test_the_output_folder_is_chosen_once_and_never_a_file(tmp_path):
    plan = plan_in(tmp_path)
    first = launcher.chosen_output_dir(plan, False, None)
    second = launcher.chosen_output_dir(plan, False, None)
    try:
        assert first != second and first.is_dir() and second.is_dir()  # claimed, not shared
    finally:
        first.rmdir()
        second.rmdir()
    assert launcher.chosen_output_dir(plan, False, str(tmp_path / "x")) == tmp_path / "x"
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        launcher.chosen_output_dir(plan, False, str(tmp_path / "file"))
    with pytest.raises(ConfigError, match="name different folders"):
        launcher.chosen_output_dir(plan, str(tmp_path / "a"), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match="no such folder"):
        launcher.chosen_output_dir(plan, True, str(tmp_path / "typo"))


def test_a_new_plan_refuses_a_folder_with_a_finished_run_before_flower_starts(tmp_path):
    plan = plan_in(tmp_path)
    runs, points = launcher.checked_runs(plan, tmp_path / "out", resume=False)
    assert points == {} and len(runs) == 1 and runs[0][2].output_dir == str(tmp_path / "out")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text(json.dumps(runs[0][2].to_dict()))
    (tmp_path / "out" / "summary.json").write_text('{"global-accuracy": 0.5}')
    with pytest.raises(ConfigError, match="holds a finished run"):
        launcher.checked_runs(plan, tmp_path / "out", resume=False)
    runs, points = launcher.checked_runs(plan, tmp_path / "out", resume=True)
    assert runs[0][2].resume and points[runs[0][2].output_dir].finished


def test_runs_go_in_order_finished_ones_skipped_failures_collected(monkeypatch, tmp_path):
    plan = plan_in(tmp_path, compare="fedqssl,fedsimclr,fedavg")
    runs, _ = launcher.checked_runs(plan, tmp_path / "out", resume=False)
    started = []

    def fake_run(config, cpus, gpus, env):
        started.append((config.algorithm, cpus, gpus))
        return 1 if config.algorithm == "fedavg" else 0

    monkeypatch.setattr(launcher, "run_once", fake_run)
    finished = ResumePoint(True, 1, None, "finished")
    points = {runs[0][2].output_dir: finished}
    failed = launcher.run_all(runs, points, 2, 0.5, {})
    assert started == [("fedsimclr", 2, 0.5), ("fedavg", 2, 0.5)]
    assert failed == [("fedavg", 0)]


def test_gpus_per_client_without_a_gpu_is_refused_not_run_on_the_cpu(tmp_path, monkeypatch):
    """No silent CPU fallback: GPUs asked for and none seen is an error before anything starts;
    with one, every run's device is cuda (a client that sees none then fails loudly)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="torch sees no GPU"):
        launcher.require_gpu({}, 0.25)
    with pytest.raises(ConfigError, match="contradicts device: cpu"):
        launcher.require_gpu({"device": "cpu"}, 0.25)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    values: dict = {}
    launcher.require_gpu(values, 0.25)
    assert values == {"device": "cuda"}
    cpu = {"device": "cpu"}
    launcher.require_gpu(cpu, 0.0)
    assert cpu == {"device": "cpu"}


def test_a_ray_address_is_checked_before_flower_starts_and_reaches_rays_init(tmp_path):
    assert launcher.checked_ray_address(None) is None
    with pytest.raises(ConfigError, match="give HOST:PORT"):
        launcher.checked_ray_address("localhost")
    with pytest.raises(ConfigError, match=r"no Ray cluster answers there .*ray start --head"):
        launcher.checked_ray_address(f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match="drop --superlink"):
        launcher.checked_ray_address("127.0.0.1:6379", superlink="127.0.0.1:9093")
    with socket.socket() as listening:  # something answers: the address is taken as given
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        address = f"127.0.0.1:{listening.getsockname()[1]}"
        assert launcher.checked_ray_address(address) == address
    assert launcher.flower_env(tmp_path, address)["RAY_ADDRESS"] == address
    assert launcher.flower_env(tmp_path).get("RAY_ADDRESS") == launcher.os.environ.get(
        "RAY_ADDRESS"
    )  # without --ray-address the caller's environment stands
