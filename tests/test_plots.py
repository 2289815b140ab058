"""The plots draw exactly the data nas.pareto computes: checked on traces, not on pixels."""

import json
import math

import optuna
import pandas as pd
import pytest
from conftest import one_line_error
from test_pareto import _study

from nas import plot
from nas.figures import history_figure, pareto_figure, write_plots
from nas.pareto import pareto_frame, trials_frame


def _trace(fig, name):
    found = [t for t in fig.data if t.name == name]
    assert len(found) == 1, [t.name for t in fig.data]
    return found[0]


@pytest.fixture(scope="module")
def df() -> pd.DataFrame:
    return trials_frame(_study())


def test_pareto_figure_data(df):
    fig = pareto_figure(df, target_ms=30.0)
    trials = _trace(fig, "trials")
    assert list(trials.x) == [10.0, 20.0, 25.0, 40.0, 45.0]  # searched, completed
    assert list(trials.y) == [0.70, 0.80, 0.75, 0.90, 0.85]
    front = _trace(fig, "Pareto front")
    assert list(front.x) == pareto_frame(df).latency_ms.tolist() == [10.0, 20.0, 40.0]
    assert list(front.y) == [0.70, 0.80, 0.90]
    assert front.line.shape == "hv" and "lines" in front.mode
    # p10/p90 latency as asymmetric error bars (attrs: p10 = 0.9 x, p90 = 1.2 x the median).
    assert list(front.error_x.array) == pytest.approx([2.0, 4.0, 8.0])
    assert list(front.error_x.arrayminus) == pytest.approx([1.0, 2.0, 4.0])
    base = _trace(fig, "baselines")
    assert list(base.x) == [5.0] and list(base.y) == [0.99]
    assert base.marker.symbol == "diamond" and list(base.text) == ["mnasnet_b1"]
    assert "baseline mnasnet_b1" in base.hovertext[0]
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 30.0


def test_pareto_hover_names_trial_arch_and_costs(df):
    fig = pareto_figure(df, target_ms=30.0)
    hover = _trace(fig, "Pareto front").hovertext[2]
    for text in ("trial 3", "arch_0.9_40.0", "reward 0.8500", "params 1 M", "MACs 50 M",
                 "accuracy 0.9000", "latency 40 ms"):
        assert text in hover, hover


def test_pareto_figure_without_target_or_points():
    fig = pareto_figure(trials_frame(_study()).iloc[0:0], target_ms=None)
    assert not fig.layout.shapes
    assert all(len(t.x) == 0 for t in fig.data)


def test_pareto_figure_with_appended_baseline_rows(df):
    """results.py appends baselines.csv rows, which have no trial number."""
    extra = pd.DataFrame([{"baseline": "mobilenet_v2", "state": "COMPLETE", "accuracy": 0.6,
                           "latency_ms": 12.0, "reward": 0.6, "arch": "mb1_k3_s1_r1_c16"}])
    fig = pareto_figure(pd.concat([df, extra], ignore_index=True), target_ms=30.0)
    base = _trace(fig, "baselines")
    assert list(base.text) == ["mnasnet_b1", "mobilenet_v2"]
    assert "mb1_k3_s1_r1_c16" in base.hovertext[1]
    assert list(_trace(fig, "Pareto front").x) == [10.0, 20.0, 40.0]


def test_history_figure_reward(df):
    fig = history_figure(df)
    trial = _trace(fig, "trial")
    assert list(trial.x) == [0, 1, 2, 3, 4]
    assert list(trial.y) == [0.71, 0.80, 0.74, 0.85, 0.85]
    assert list(_trace(fig, "best so far").y) == [0.71, 0.80, 0.80, 0.85, 0.85]
    assert "arch_0.75_25.0" in trial.hovertext[2]
    # The baseline's reward as a reference line.
    assert [s.y0 for s in fig.layout.shapes] == [0.99]


def test_history_figure_two_objectives():
    fig = history_figure(trials_frame(_study(multi=True)))
    assert list(_trace(fig, "accuracy").y) == [0.70, 0.80, 0.75, 0.90, 0.85]
    assert list(_trace(fig, "latency (ms)").y) == [10.0, 20.0, 25.0, 40.0, 45.0]
    assert list(_trace(fig, "best latency (ms) so far").y) == [10.0] * 5
    assert _trace(fig, "latency (ms)").yaxis == "y2"


def test_write_plots_writes_self_contained_pages(df, tmp_path):
    paths = write_plots(df, tmp_path / "run", target_ms=30.0)
    assert [p.name for p in paths] == ["pareto.html", "history.html"]
    for path in paths:
        html = path.read_text()
        assert '<script src="https:' not in html and "plotly.js v" in html  # works offline
    assert "arch_0.9_40.0" in paths[0].read_text()
    assert not list((tmp_path / "run").glob(".*.tmp"))


@pytest.fixture
def run_folder(tmp_path):
    """A run folder as nas.search leaves it: run.json and the study in study.db."""
    study = _study()
    optuna.copy_study(from_study_name=study.study_name, from_storage=study._storage,
                      to_storage=f"sqlite:///{tmp_path / 'study.db'}", to_study_name="r")
    (tmp_path / "run.json").write_text(json.dumps({"study_name": "r",
                                                   "settings": {"target_ms": 30.0}}))
    return tmp_path


def test_plot_rewrites_a_run_from_its_storage(run_folder, capsys):
    assert plot.main([str(run_folder), "--target-ms", "35"]) == 0
    assert "pareto.html" in capsys.readouterr().out
    assert (run_folder / "trials.csv").is_file() and (run_folder / "pareto.html").is_file()


@pytest.mark.parametrize("target", [-5, 0, math.nan, math.inf])
def test_plot_refuses_a_target_that_is_not_a_positive_number(run_folder, capsys, target):
    assert plot.main([str(run_folder), "--target-ms", str(target)]) == 2
    one_line_error(capsys, "nas.plot", f"--target-ms {target:g}")
    assert sorted(p.name for p in run_folder.iterdir()) == ["run.json", "study.db"]


def test_the_plot_command_does_not_pull_in_training_code():
    # nas.plot used to import nas.export, which imports nas.train and nas.proxy
    import subprocess
    import sys

    code = ("import sys, nas.plot; print(sorted(m for m in ('nas.train', 'nas.proxy', "
            "'nas.export', 'nas.search') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert out.strip() == "[]"


def test_labels_of_nearby_points_are_placed_apart_and_far_ones_stay_put():
    from nas.figures import label_positions

    # mobilenet_v2 and mobilenet_v2@0.9 0.15 ms and 0.2 points apart: plotly would print one
    # name over the other at "middle right"
    x, y = [4.71, 4.86, 9.0], [0.395, 0.397, 0.60]
    names = ["mobilenet_v2@0.9", "mobilenet_v2", "far"]
    got = label_positions(x, y, names)
    assert got[0] == "middle right" and got[1] != "middle right" and got[2] == "middle right"
    # spread out, every label where it was
    assert label_positions([1, 5, 9], [0.1, 0.5, 0.9], names) == ["middle right"] * 3
    # a point without coordinates takes the first position and does not block the others
    assert label_positions([4.71, math.nan, 4.71], [0.4, math.nan, 0.9], names) == [
        "middle right"] * 3
    assert label_positions([math.nan], [math.nan], ["x"], order=("top center",)) == [
        "top center"]


def test_the_baselines_labels_dodge_each_other(df):
    extra = pd.DataFrame([{"baseline": f"mobilenet_v2@{w}", "state": "COMPLETE",
                           "accuracy": 0.6 + w / 1000, "latency_ms": 12.0 + w / 100,
                           "reward": 0.6, "arch": "mb1_k3_s1_r1_c16"} for w in (0.9, 1.0)])
    fig = pareto_figure(pd.concat([df, extra], ignore_index=True), target_ms=30.0)
    positions = list(_trace(fig, "baselines").textposition)
    assert len(positions) == 3 and positions.count("top center") == 2  # one of the two moved
    assert len(set(positions)) == 2
