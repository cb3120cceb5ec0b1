"""Comparison tables: mean ± sample spread over seeds, failed runs named, plots drawn."""

import math

import pytest
from core_helpers import plotted

from common.runs import report


def summary(global_acc, local_acc, ratio=0.25, floor=(0.4, 0.7)):
    return {
        "global-accuracy": global_acc,
        "mean-local-accuracy": local_acc,
        "untrained-global-accuracy": floor[0],
        "untrained-mean-local-accuracy": floor[1],
        "uplink-ratio-to-fp32": ratio,
        "uplink-bytes": 6_000_000,
        "rounds": 3,
    }


def test_table_gives_mean_and_sample_spread_and_names_failed_seeds():
    rows = [
        report.Row("Fed-QSSL", [summary(0.5, 0.8), summary(0.6, 0.9), None], [0, 1, 2]),
        report.Row("FedAvg", [None], [0]),
    ]
    table = report.comparison_table(rows)
    # mean 55.00, sample std of (50, 60) = 7.07; local 85.00 ± 7.07; gains over the floors
    # (40, 70): +10 and +20 points global, +10 and +20 local; 6 MB over 3 rounds
    assert (
        "| Fed-QSSL | 55.00 ± 7.07 | 85.00 ± 7.07 | +15.00 ± 7.07 | +15.00 ± 7.07 | 2.000 | "
        "0.250 | 2/3, failed seeds [2] |" in table
    )
    assert "| FedAvg | n/a | n/a | n/a | n/a | n/a | n/a | 0/1, failed seeds [0] |" in table


def test_gains_are_paired_with_each_runs_own_floor_and_the_floor_is_a_row():
    row = report.Row(
        "Fed-SimCLR",
        [summary(0.80, 0.90, floor=(0.78, 0.89)), summary(0.70, 0.85, floor=(0.66, 0.80))],
        [0, 1],
    )
    # paired: +2 and +4 points global (not 75 - 72 = +3 from the means alone)
    assert report.percent(row.gains("global-accuracy"), signed=True) == "+3.00 ± 1.41"
    floor = report.untrained_row(row)
    assert floor.values("global-accuracy") == [0.78, 0.66]
    table = report.comparison_table([row], floor=floor)
    assert (
        table.splitlines()[2] == "| untrained | 72.00 ± 8.49 | 84.50 ± 6.36 | — | — | — | — | 2/2 |"
    )
    per_seed = report.per_seed_table([floor, row])
    assert "| untrained | 78.00 / 89.00 | 66.00 / 80.00 |" in per_seed
    assert "| Fed-SimCLR | 80.00 / 90.00 (floor 78.00 / 89.00) | 70.00 / 85.00 (floor 66.00 / " in (
        per_seed
    )


def test_mean_spread_edge_cases():
    assert report.mean_spread([0.3]) == (0.3, 0.0)
    assert all(math.isnan(x) for x in report.mean_spread([]))
    assert report.percent([0.5931]) == "59.31"


def test_plots_draw_their_rows(tmp_path):
    """Each plot decodes and holds a drawing, and other numbers draw another picture."""
    rows = [report.Row(str(b), [summary(0.4 + b / 10, 0.7)], [0]) for b in (0.1, 0.5, 1.0)]
    lower = [report.Row(str(b), [summary(0.2, 0.3)], [0]) for b in (0.1, 0.5, 1.0)]
    for name, rows_drawn in (("c", rows), ("c-lower", lower)):
        report.plot_comparison(rows_drawn, tmp_path / f"{name}.png", "t")
        report.plot_sweep(rows_drawn, "dirichlet-beta", tmp_path / f"s-{name}.png", "t")
    for name in ("c", "s-c"):
        drawn, other = plotted(tmp_path / f"{name}.png"), plotted(tmp_path / f"{name}-lower.png")
        assert drawn.shape != other.shape or (drawn != other).any(), name


def test_a_single_score_table_has_one_value_and_one_paired_gain_column():
    runs = [
        {**summary(0.7, 0.9), "knn-accuracy": 0.56, "untrained-knn-accuracy": 0.46},
        {**summary(0.7, 0.9), "knn-accuracy": 0.52, "untrained-knn-accuracy": 0.46},
    ]
    row = report.Row("Fed-SimCLR", runs, [0, 1])
    table = report.comparison_table(
        [row], floor=report.untrained_row(row), scores=report.KNN, traffic=False
    ).splitlines()
    assert table[0] == "| Algorithm | Global kNN (%) | Gain | Runs |"
    assert table[2] == "| untrained | 46.00 ± 0.00 | — | 2/2 |"
    assert table[3] == "| Fed-SimCLR | 54.00 ± 2.83 | +8.00 ± 2.83 | 2/2 |"


def scored(probe, knn, local, seed_steps=(240, 360)):
    return {
        "global-probe-accuracy": probe,
        "knn-accuracy": knn,
        "mean-local-accuracy": local,
        "train-steps": seed_steps[0] * 6,
        "server-steps": seed_steps[1] * 6,
        "dequantize-steps": 240 * 6,
        "requantize-steps": 120 * 6,
        "rounds": 6,
        "weight-range": [0.24, 0.26],
    }


def test_paired_differences_pair_runs_by_seed_and_skip_unfinished_seeds():
    a = report.Row("Fed-QSSL", [scored(0.70, 0.60, 0.9), scored(0.66, 0.5, 0.8), None], [0, 1, 2])
    b = report.Row("Fed-SimCLR", [scored(0.66, 0.55, 0.9), None, scored(0.1, 0.1, 0.1)], [0, 1, 2])
    assert report.paired_differences(a, b, "global-probe-accuracy") == {0: pytest.approx(0.04)}
    c = report.Row("uniform", [scored(0.69, 0.58, 0.91), scored(0.68, 0.5, 0.8)], [0, 1])
    table = report.paired_table([(a, b), (a, c)])
    assert "| Fed-QSSL - Fed-SimCLR | +4.00 (+4.00) | +5.00 (+5.00) | +0.00 (+0.00) | 0 |" in table
    # seed 0: +1, seed 1: -2 probe points: mean -0.50, sample sd 2.12
    assert "| Fed-QSSL - uniform | -0.50 ± 2.12 (+1.00, -2.00) |" in table


def test_budget_table_gives_steps_per_round_and_n_a_for_runs_without_them():
    rows = [
        report.Row("Fed-QSSL", [scored(0.7, 0.6, 0.9), scored(0.7, 0.6, 0.9)], [0, 1]),
        report.Row("old", [{"global-accuracy": 0.5, "rounds": 3}], [0]),
    ]
    table = report.budget_table(rows)
    assert "| Fed-QSSL | 240 | 360 | 240 | 120 | 0.240-0.260 |" in table
    assert "| old | n/a | n/a | n/a | n/a | n/a |" in table
