"""Comparison tables: mean ± sample spread over seeds, failed runs named, plots drawn."""

import math

from common import report


def summary(global_acc, local_acc, ratio=0.25):
    return {
        "global-accuracy": global_acc,
        "mean-local-accuracy": local_acc,
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
    # mean 55.00, sample std of (50, 60) = 7.07; local 85.00 ± 7.07; 6 MB over 3 rounds
    assert (
        "| Fed-QSSL | 55.00 ± 7.07 | 85.00 ± 7.07 | 2.000 | 0.250 | 2/3, failed seeds [2] |"
        in table
    )
    assert "| FedAvg | n/a | n/a | n/a | n/a | 0/1, failed seeds [0] |" in table


def test_mean_spread_edge_cases():
    assert report.mean_spread([0.3]) == (0.3, 0.0)
    assert all(math.isnan(x) for x in report.mean_spread([]))
    assert report.percent([0.5931]) == "59.31"


def test_plots_are_pngs(tmp_path):
    rows = [report.Row(str(b), [summary(0.4 + b / 10, 0.7)], [0]) for b in (0.1, 0.5, 1.0)]
    report.plot_comparison(rows, tmp_path / "c.png", "t")
    report.plot_sweep(rows, "dirichlet-beta", tmp_path / "s.png", "t")
    for name in ("c.png", "s.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
