"""End to end: ``simulation.py`` drives a real ``flwr run`` on the Ray backend."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from core_helpers import plotted
from simulations import ROOT, TINY, finished_simulation, run_simulation, start_simulation
from superlinks import announced_superlink, running

import simulation
from common.atomic import claim_new_folder
from common.config import ConfigError, ExperimentConfig
from common.runs import launcher, provenance
from common.runs.checkpoint import reuse_problem
from common.runs.plan import algorithm_row, plan_runs, safe_name
from common.runs.superlink import (
    SuperLinkError,
    checked_address,
    free_port,
    is_healthy,
    process_tree,
    simulation_superlink,
    stop_processes,
)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory):
    """Three users on one machine at once: a SuperLink of their own (started as
    ``simulation_superlink`` starts one), a tiny run told to use it (``--superlink``), and a
    comparison of two rows that starts its own. Both runs must finish, neither may stop or
    reuse the other's SuperLink."""
    base = tmp_path_factory.mktemp("side-by-side")
    own_home = base / "own"
    with simulation_superlink(own_home, launcher.flower_env(own_home)) as own:
        tiny = start_simulation(base / "tiny", TINY, "--superlink", own.address)
        comparison_preset = TINY + f"compare: [{', '.join(ALL_ROWS)}]\n"
        comparison = start_simulation(base / "compare", comparison_preset, "--keep-superlink")
        tiny_result = finished_simulation(base / "tiny", tiny, own.env)
        comparison_result = finished_simulation(base / "compare", comparison)
        own_alive_after = running(own.pid) and is_healthy(own.address)
    return {
        "tiny": tiny_result,
        "comparison": comparison_result,
        "own": own,
        "own-alive-after": own_alive_after,
    }


@pytest.fixture(scope="module")
def tiny_run(side_by_side):
    return side_by_side["tiny"]


@pytest.mark.slow
def test_runs_side_by_side_each_on_its_own_superlink(side_by_side):
    own = side_by_side["own"]
    tiny, _, _ = side_by_side["tiny"]
    comparison, _, _ = side_by_side["comparison"]
    assert f"==> on the SuperLink at {own.address} (--superlink; left running)" in tiny.stdout
    assert side_by_side["own-alive-after"]  # a run given --superlink leaves it running
    pid, address, home = announced_superlink(comparison.stdout)
    assert pid != own.pid and address != own.address
    assert home.parent == own.home.parents[2] / "compare" / "flwr" / "superlinks"
    deadline = time.monotonic() + 60
    while running(pid):  # stopped, by its pid, with what ran under it
        assert time.monotonic() < deadline, "the comparison's SuperLink outlived its stop"
        time.sleep(0.1)
    assert not running(own.pid)  # and the test's own, at the end of its block


def test_a_superlink_address_is_checked_before_anything_starts(tmp_path):
    for bad in ("localhost", "127.0.0.1:99999", "a b:80", "http://x:1"):
        with pytest.raises(ValueError, match="give HOST:PORT"):
            checked_address(bad)
    assert checked_address("[::1]:9093") == "[::1]:9093"
    nothing_there = f"127.0.0.1:{free_port()}"
    with (
        pytest.raises(SuperLinkError, match="no SuperLink answers there"),
        simulation_superlink(tmp_path, {}, nothing_there),
    ):
        pass
    assert not (tmp_path / "superlinks").exists()  # nothing of that attempt is left


def test_a_process_tree_follows_exactly_the_parent_pid_it_names():
    """SuperExec names its SuperLink with ``--parent-pid P``: P's tree holds it, a pid whose
    digits begin P's (23 and 2344) does not."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "--parent-pid", "2344"]
    )
    try:
        assert child.pid in process_tree({2344})
        assert child.pid not in process_tree({23}) and child.pid not in process_tree({234})
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_simulation_finishes_and_writes_results(tiny_run):
    completed, status, output_dir = tiny_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert status["status"] == "finished:completed"
    assert "==> results summary" in completed.stdout

    summary = json.loads((output_dir / "summary.json").read_text())
    assert 0 <= summary["global-accuracy"] <= 1
    gain = summary["global-accuracy"] - summary["untrained-global-accuracy"]
    assert "untrained floor (initial model, same protocol): global " in completed.stdout
    assert f"(gain {gain:+.4f})" in completed.stdout
    assert sorted(c["bitwidth"] for c in summary["local-accuracy"]) == [4, 8, 12]
    assert all(0 <= c["local-accuracy"] <= 1 for c in summary["local-accuracy"])
    assert 0 < summary["uplink-ratio-to-fp32"] < 1

    rounds = [json.loads(line) for line in (output_dir / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(c["bitwidth"] for c in record["clients"]) == [4, 8, 12]
        assert record["failed"] == []
        assert abs(sum(c["weight"] for c in record["clients"]) - 1) < 1e-6
        by_bits = {c["bitwidth"]: c["uplink-bytes"] for c in record["clients"]}
        assert by_bits[4] < by_bits[8] < by_bits[12] < record["fp32-equivalent-bytes"] / 3
    # round 1 downlink is the fp32 initial model; round 2 sends each client its own bitwidth
    down = {c["bitwidth"]: c["downlink-bytes"] for c in rounds[1]["clients"]}
    assert down[4] < down[8] < down[12] < rounds[0]["clients"][0]["downlink-bytes"]

    # what made it: this checkout's commit (stamped by the launcher, though the run went to
    # another SuperLink), the code the ServerApp ran, packages, CPU, resources as resolved
    record = summary["provenance"]
    head, dirty = provenance.git_state(ROOT)
    assert (record["commit"], record["dirty"]) == (head, dirty) and record["commit"]
    assert record["code-hash"] == provenance.code_hash(ROOT)
    assert record["launcher"] == "simulation.py" and "--superlink" in record["command"]
    assert record["versions"] == provenance.versions() and record["cpu"]["isa"]
    assert record["device"] == {"server": "cpu", "clients": ["cpu"]}
    assert record["allocator"] == {"clients": ["fast"]}  # auto: fast in a simulation
    assert record["threads"]["clients"] == [1] and record["threads"]["server"] >= 1
    assert record["same-code-every-round"] and record["started"]
    assert all(r["code-hash"] == record["code-hash"] for r in rounds)

    config = json.loads((output_dir / "config.json").read_text())
    assert config["bitwidths"] == [4, 8, 12] and config["num-rounds"] == 2
    # the records hold no path of this machine (results get moved and committed)
    for record in output_dir.iterdir():
        if record.suffix in (".json", ".jsonl", ".toml"):
            assert str(output_dir.parent) not in record.read_text(), record.name
    assert 'output-dir = "."' in (output_dir / "run_config.toml").read_text()
    for plot in ("accuracy.png", "bytes.png"):
        plotted(output_dir / plot)


@pytest.mark.slow
def test_a_failed_server_makes_simulation_exit_non_zero(tmp_path):
    broken = TINY.replace("dataset: synthetic", "dataset: cifar10\ndata-dir: /nonexistent-dir")
    completed, status, _ = run_simulation(tmp_path, broken)
    assert status is not None and status["status"].startswith("finished:failed")
    assert completed.returncode == 1
    assert "failed" in completed.stderr


def test_stopping_a_superlink_stops_everything_under_it():
    """A ServerApp left behind by a killed SuperLink runs on and writes into its results folder
    (seen: an orphaned flwr-simulation finished all rounds after the SIGKILL): the whole tree
    goes."""
    parent = subprocess.Popen(
        ["bash", "-c", "sleep 600 & (sleep 600 & wait) & wait"], start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while len(process_tree({parent.pid})) < 4:  # bash, its subshell, two sleeps
            assert time.monotonic() < deadline, "the process tree never started"
            time.sleep(0.05)
        tree = process_tree({parent.pid}) - {parent.pid}
        stop_processes({parent.pid}, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 30
        while any(running(pid) for pid in tree):
            assert time.monotonic() < deadline, "a descendant outlived its stopped parent"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)


def test_invalid_preset_is_rejected_before_anything_starts(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text(TINY.replace("bitwidths: [4, 8, 12]", "bitwidths: [4, 8, 33]"))
    completed = refused_before_start(str(preset))
    assert "bitwidths: bitwidth 33 is not allowed" in completed.stderr


def refused_before_start(*argv: str) -> subprocess.CompletedProcess:
    """simulation.py run with ``argv``, asserted to stop with exit status 2 (a bad input)."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "simulation.py"), *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,  # only a hang guard: it stops before any Flower process starts
    )
    assert completed.returncode == 2, completed.stderr
    return completed


# Two rows through real Flower, each a different kind: Fed-QSSL's server on low-bit SSL clients,
# and a full-precision supervised classifier (its own score and the SSL probe's table); every
# algorithm and row federates in process in tests/test_algorithms.py, where the rest are covered
# (each row through Ray costs about half a minute, most of it Ray's start-up).
ALL_ROWS = ["fedqssl", "fedavg-full"]


@pytest.fixture(scope="module")
def comparison_run(side_by_side):
    """Two rows on the same tiny partition, 2 rounds, through ``flwr run``."""
    return side_by_side["comparison"]


@pytest.mark.slow
def test_comparison_runs_its_rows_end_to_end_and_tabulates(comparison_run):
    completed, _, output_dir = comparison_run
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for row in ALL_ROWS:
        run_dir = output_dir / row / "seed-0"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["algorithm"] == algorithm_row(row)["algorithm"]
        assert summary["rounds"] == 2
        # the untrained floor, under each protocol, beside every trained score
        for key in ("global-accuracy", "mean-local-accuracy"):
            for score in (key, key.replace("accuracy", "probe-accuracy")):
                assert 0 <= summary[f"untrained-{score}"] <= 1, (row, score)
        assert sorted(c["bitwidth"] for c in summary["local-accuracy"]) == (
            [32, 32, 32] if row.endswith("-full") else [4, 8, 12]
        )
        assert 0 <= summary["global-accuracy"] <= 1
        ratio = summary["uplink-ratio-to-fp32"]
        assert ratio == pytest.approx(1.0) if row.endswith("-full") else 0 < ratio < 0.5
        rounds = (run_dir / "rounds.jsonl").read_text().splitlines()
        assert [json.loads(line)["failed"] for line in rounds] == [[], []]
    table = (output_dir / "comparison.md").read_text()
    for label in ("Fed-QSSL", "FedAvg (Full)"):
        assert f"| {label} |" in table
    assert "1/1 |" in table
    data = json.loads((output_dir / "comparison.json").read_text())
    assert list(data["rows"]) == ["untrained", *ALL_ROWS] and data["seeds"] == [0]
    # the invocation's provenance, and every run of it at the same commit
    assert data["provenance"]["commit"] == provenance.git_state(ROOT)[0]
    assert data["provenance"]["versions"]["flwr"] == provenance.versions()["flwr"]
    commits = {s["provenance"]["commit"] for r in ALL_ROWS for s in data["rows"][r]["summaries"]}
    assert commits == {data["provenance"]["commit"]}
    # the untrained row is the floor of the first low-bit SSL row (Fed-QSSL), in the score keys
    floor = data["rows"]["untrained"]["summaries"][0]
    first_ssl = data["rows"]["fedqssl"]["summaries"][0]
    assert floor["global-accuracy"] == first_ssl["untrained-global-accuracy"]
    untrained_line = next(line for line in table.splitlines() if line.startswith("| untrained |"))
    assert f"| {100 * floor['global-accuracy']:.2f} |" in untrained_line
    # supervised rows are also scored by the SSL probe, in a table of their own
    assert "## Every row under the SSL probe" in table and "## Per seed" in table
    assert "## Global kNN monitor" in table
    assert 0 <= floor["knn-accuracy"] == first_ssl["untrained-knn-accuracy"] <= 1
    plotted(output_dir / "comparison.png")


def plan_of(tmp_path, preset_text, *argv):
    preset = tmp_path / "plan.yaml"
    preset.write_text(preset_text)
    parser_args = simulation.build_parser().parse_args([str(preset), *argv])
    return simulation.plan_from(parser_args)


def test_plans_expand_rows_seeds_and_sweeps(tmp_path):
    plan = plan_of(tmp_path, TINY + "compare: [fedqssl, fedqssl-full]\nseeds: [0, 1, 2]\n")
    runs = plan_runs(plan, tmp_path / "out")
    assert [(row, seed) for row, seed, _ in runs] == [
        (row, seed) for row in ("fedqssl", "fedqssl-full") for seed in (0, 1, 2)
    ]
    full = [config for row, _, config in runs if row == "fedqssl-full"]
    assert all(
        config.bitwidths == (32, 32, 32) and config.algorithm == "fedqssl" for config in full
    )
    assert len({config.output_dir for _, _, config in runs}) == 6
    assert algorithm_row("fedqssl-full-uniform") == {
        "algorithm": "fedqssl",
        "bitwidths": "32",
        "dq-weighting": "uniform",
    }
    assert algorithm_row("fedsimclr-ft") == {"algorithm": "fedsimclr-ft"}
    assert algorithm_row("fedsimclr-full-clamp") == {
        "algorithm": "fedsimclr",
        "bitwidths": "32",
        "fp-activation": "clamp",
    }

    paired = plan_of(
        tmp_path,
        TINY + "compare: [fedqssl, fedsimclr]\npairs: [fedqssl - fedsimclr, fedqssl - fedavg]\n",
    )
    assert paired.pairs == [("fedqssl", "fedsimclr")]  # fedavg is not compared here

    sweep = plan_of(tmp_path, TINY, "--sweep", "dirichlet-beta=0.1,1.0", "--seeds", "4")
    configs = [config for _, _, config in plan_runs(sweep, tmp_path / "s")]
    assert [(c.dirichlet_beta, c.seed) for c in configs] == [(0.1, 4), (1.0, 4)]


@pytest.mark.parametrize(
    ("extra", "argv", "message"),
    [
        ("compare: [fedqssl, fedsgd]\n", (), "unknown row 'fedsgd'"),
        ("", ("--sweep", "dirichlet-beta"), "--sweep expects key=v1,v2"),
        ("", ("--sweep", "dirichlet-beta=0.1,-1"), "dirichlet-beta: must be > 0"),
        ("sweep: {local-epochs: [1], seed: [1]}\n", (), "sweep must name one config key"),
        ("", ("--seeds", "a,b"), "seeds must be integers >= 0 like 0,1,2, got 'a,b'"),
        ("seeds: [0, -1]\n", (), "seed: must be in [0, 2**31)"),
        ("num-rounds: 3\n", (), "config key 'num-rounds' is given twice (line 12)"),
        ("compare: [fedqssl]\npairs: [fedqssl-fedsimclr]\n", (), "is not 'ROW - ROW'"),
        ("compare: [fedqssl]\npairs: [fedqssl - fedsgd]\n", (), "unknown row 'fedsgd'"),
    ],
)
def test_bad_plans_are_rejected_with_the_reason(tmp_path, extra, argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        plan = plan_of(tmp_path, TINY + extra, *argv)
        plan_runs(plan, tmp_path / "out")


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_preset_is_a_valid_plan(tmp_path, preset):
    plan = simulation.plan_from(simulation.build_parser().parse_args([str(preset)]))
    runs = plan_runs(plan, tmp_path)
    assert runs and all(config.num_clients == len(config.bitwidths) for _, _, config in runs)


def test_a_preset_by_bare_name_and_an_output_dir_that_is_a_file(tmp_path):
    assert (
        simulation.build_parser().parse_args(["quickstart"]).preset
        == ROOT / "configs" / "quickstart.yaml"
    )
    assert (
        simulation.build_parser().parse_args(["fmnist-learning.yaml"]).preset.name
        == "fmnist-learning.yaml"
    )
    with pytest.raises(SystemExit):
        simulation.build_parser().parse_args(["no-such-preset"])
    a_file = tmp_path / "taken"
    a_file.write_text("")
    completed = refused_before_start("quickstart", "--output-dir", str(a_file))
    assert "is a file: name a folder" in completed.stderr


def test_help_explains_every_option_and_lists_examples_and_presets():
    parser = simulation.build_parser()
    assert all(action.help for action in parser._actions)
    text = parser.format_help()
    assert "examples:" in text and "--resume" in text
    for preset in (ROOT / "configs").glob("*.yaml"):
        assert preset.stem in text


def test_default_folders_are_new_even_for_runs_started_in_the_same_second(tmp_path):
    first = claim_new_folder(tmp_path / "results" / "quickstart-20261202-120000")
    second = claim_new_folder(tmp_path / "results" / "quickstart-20261202-120000")
    assert first.is_dir() and second == first.with_name(first.name + "-2") and second.is_dir()


def test_row_folders_stay_inside_the_output_folder_and_never_collide(tmp_path):
    assert safe_name("..") == "_.." and safe_name(".hidden") == "_.hidden"
    assert safe_name("a/b") == "a_b" and safe_name("0.1") == "0.1"
    sweep = plan_of(tmp_path, TINY, "--sweep", "data-dir=..,/tmp/x")
    for _, _, config in plan_runs(sweep, tmp_path / "out"):
        assert Path(config.output_dir).resolve().is_relative_to((tmp_path / "out").resolve())
    clash = plan_of(tmp_path, TINY, "--sweep", "data-dir=a/b,a_b")
    with pytest.raises(ConfigError, match="rows 'a/b' and 'a_b' would share the folder 'a_b'"):
        plan_runs(clash, tmp_path / "out")
    with pytest.raises(ConfigError, match=r"seed is not swept.*--seeds 0,1,2"):
        plan_of(tmp_path, TINY, "--sweep", "seed=0,1,2")


def test_resume_refuses_a_missing_folder_or_one_without_this_plans_runs(tmp_path):
    completed = refused_before_start("quickstart", "--resume", str(tmp_path / "typo"))
    assert "no such folder (a typo?)" in completed.stderr
    (tmp_path / "other").mkdir()
    completed = refused_before_start("quickstart", "--resume", str(tmp_path / "other"))
    assert "holds no run" in completed.stderr
    # a comparison folder holding seed 0 may be resumed with more seeds
    (tmp_path / "other" / "fedqssl" / "seed-0").mkdir(parents=True)
    (tmp_path / "other" / "fedqssl" / "seed-0" / "config.json").write_text("{}")
    assert launcher.has_runs(tmp_path / "other")


def test_a_new_run_never_writes_over_a_folder_it_does_not_own(tmp_path):
    config = ExperimentConfig.from_mapping({"num-clients": 2, "bitwidths": "4"}).to_dict()
    folder = tmp_path / "run"
    assert reuse_problem(folder, config) is None  # not there yet
    folder.mkdir()
    assert reuse_problem(folder, config) is None  # empty
    (folder / "notes.txt").write_text("the user's")
    assert "holds no fedqssl run" in reuse_problem(folder, config)
    (folder / "config.json").write_text(json.dumps({**config, "learning-rate": 0.01}))
    assert "another config (learning-rate: 0.01 -> 0.003)" in reuse_problem(folder, config)
    (folder / "config.json").write_text(json.dumps(config))
    assert reuse_problem(folder, config) is None  # an interrupted run of this config
    (folder / "summary.json").write_text("{}")
    assert "holds a finished run: give --resume" in reuse_problem(folder, config)
    completed = refused_before_start("quickstart", "--output-dir", str(folder))
    assert "holds a finished run" in completed.stderr and (folder / "notes.txt").exists()
