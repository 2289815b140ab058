"""A damaged run folder (run.json, baselines.csv) is one line from nas.export and nas.plot.

Each case exits 2 with one stderr line naming the file and the field, and leaves every file in
the run folder (and every output file) as it was: inputs are checked before anything is written.
"""

import json
import shutil

import pandas as pd
import pytest
from conftest import one_line_error

from nas import export, plot, search
from nas.results import BaselinesError, load_baselines


def search_argv(image_folder, runs, trials=1):
    return ["--space", "tiny", "--val-size", "30", "--proxy-images", "64", "--proxy-epochs", "1",
            "--proxy-batch", "32", "--input-size", "32", "--latency-time", "0.1",
            "--target-ms", "1", "--trials", str(trials), "--sampler", "random", "--data",
            str(image_folder), "--runs-dir", str(runs), "--name", "x"]


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    """One tiny finished search (one trial), copied by each test before it is damaged."""
    runs = tmp_path_factory.mktemp("runs")
    assert search.main(search_argv(image_folder, runs)) == 0
    return runs / "x"


@pytest.fixture
def run(finished_run, tmp_path):
    return shutil.copytree(finished_run, tmp_path / "runs" / "x")


def snapshot(folder):
    """Every file's bytes and modification time, by name: what "unchanged" means here."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def edit_run_json(run, path, value):
    """Set run.json's field `path` ("settings.target_ms") to `value`."""
    meta = json.loads((run / "run.json").read_text())
    *outer, key = path.split(".")
    where = meta
    for name in outer:
        where = where[name]
    where[key] = value
    (run / "run.json").write_text(json.dumps(meta, indent=2))


def run_tool(tool, run, tmp_path):
    """nas.export (with a TorchScript network, which uses every field) or nas.plot."""
    outputs = [tmp_path / "a.yaml", tmp_path / "a.pt"]
    if tool == "nas.export":
        status = export.main([str(run), "-o", str(outputs[0]), "--torchscript", str(outputs[1])])
    else:
        status = plot.main([str(run)])
    return status, outputs


def check_refused(tool, run, tmp_path, capsys, fragment):
    before = snapshot(run)
    status, outputs = run_tool(tool, run, tmp_path)
    assert status == 2
    line = one_line_error(capsys, tool, fragment)
    assert snapshot(run) == before
    assert not any(p.exists() for p in outputs)
    return line


@pytest.mark.parametrize("tool", ["nas.export", "nas.plot"])
def test_an_intact_run_folder_is_read(run, tmp_path, capsys, tool):
    # the fixture's run.json has storage null, as every run with its own study.db
    status, outputs = run_tool(tool, run, tmp_path)
    assert status == 0, capsys.readouterr().err
    if tool == "nas.export":
        assert all(p.is_file() for p in outputs)


BAD_RUN_JSON = [
    ("settings", None, "an object"),
    ("settings", [1, 2], "an object"),
    ("settings.input_size", "abc", "an integer >= 32"),
    ("settings.input_size", 4, "an integer >= 32"),
    ("settings.input_size", 224.5, "an integer >= 32"),
    ("settings.target_ms", "abc", "a finite number > 0"),
    ("settings.target_ms", -1, "a finite number > 0"),
    ("settings.target_ms", None, "a finite number > 0"),
    ("num_classes", 0, "an integer >= 1"),
    ("num_classes", True, "an integer >= 1"),
    ("study_name", None, "a string"),
    ("storage", 5, "a storage URL"),
]


@pytest.mark.parametrize("tool", ["nas.export", "nas.plot"])
@pytest.mark.parametrize("field, value, allowed", BAD_RUN_JSON,
                         ids=[f"{f}={v!r}" for f, v, _ in BAD_RUN_JSON])
def test_a_bad_run_json_field_is_one_line_and_changes_nothing(run, tmp_path, capsys, tool,
                                                              field, value, allowed):
    edit_run_json(run, field, value)
    line = check_refused(tool, run, tmp_path, capsys, f"{run / 'run.json'}: {field} must be ")
    assert allowed in line


@pytest.mark.parametrize("tool", ["nas.export", "nas.plot"])
def test_a_non_finite_target_in_run_json_is_refused(run, tmp_path, capsys, tool):
    # json writes float("nan") as NaN, and Python's json reads it back
    edit_run_json(run, "settings.target_ms", float("nan"))
    check_refused(tool, run, tmp_path, capsys, "run.json: settings.target_ms must be ")


BAD_BASELINES = [
    ('garbage,"unterminated', "not a readable CSV"),  # pandas: ParserError
    ("", "not a readable CSV"),  # pandas: EmptyDataError
    ("a,b\n1,2\n", "no column baseline, state"),
    ("baseline,accuracy\nmobilenet_v2,0.5\n", "no column state"),
    ("baseline,state,accuracy,latency_ms\n,COMPLETE,0.9,1.0\n", "data row 1 has none"),
]


@pytest.mark.parametrize("text, fragment", BAD_BASELINES,
                         ids=["unterminated", "empty", "other-columns", "no-state", "unnamed"])
def test_a_damaged_baselines_csv_is_one_line_and_changes_nothing(run, tmp_path, capsys, text,
                                                                 fragment):
    # trials.csv, pareto.csv and best.yaml used to be rewritten before the traceback
    (run / "baselines.csv").write_text(text)
    line = check_refused("nas.plot", run, tmp_path, capsys, f"{run / 'baselines.csv'}: ")
    assert fragment in line
    with pytest.raises(BaselinesError, match=fragment):  # what nas.search can catch
        load_baselines(run)


def test_a_valid_baselines_csv_is_plotted(run, tmp_path, capsys):
    pd.DataFrame([{"baseline": "mobilenet_v2", "state": "COMPLETE", "accuracy": 0.5,
                   "latency_ms": 2.0, "reward": 0.5},
                  {"baseline": "mnasnet_a1", "state": "FAIL", "fail_reason": "out of memory"}]
                 ).to_csv(run / "baselines.csv", index=False)
    assert plot.main([str(run)]) == 0, capsys.readouterr().err
    assert "mobilenet_v2" in (run / "pareto.html").read_text()


def test_resuming_a_search_over_a_damaged_baselines_csv_is_one_line(run, image_folder, tmp_path,
                                                                   capsys):
    # a pandas traceback, after run.json was rewritten
    (run / "baselines.csv").write_text('garbage,"unterminated')
    before = snapshot(run)
    assert search.main(search_argv(image_folder, run.parent, trials=2)) == 2
    one_line_error(capsys, "nas.search", f"{run / 'baselines.csv'}: not a readable CSV table")
    assert snapshot(run) == before
