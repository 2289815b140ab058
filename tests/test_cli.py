"""What every command-line tool shares: usage errors as one line, exit status 2; Ctrl-C and
SIGTERM as one line; OpenMP's spin-wait shortened before torch loads."""

import os
import subprocess
import sys

import pytest
from conftest import one_line_error

from nas import export, latency, plot, search, summary, train
from nas.cli import Terminated, run_tool

TOOLS = {"nas.export": export, "nas.latency": latency, "nas.plot": plot, "nas.search": search,
         "nas.summary": summary, "nas.train": train}
REQUIRED = {"nas.export": ["-o", "a.yaml"], "nas.search": ["--target-ms", "80"]}


@pytest.mark.parametrize("name", TOOLS)
def test_an_unknown_flag_is_one_line_naming_it(name, capsys):
    # argparse's own error printed the whole usage first: 2-16 lines
    with pytest.raises(SystemExit) as exit_:
        status = TOOLS[name].main(["x", *REQUIRED.get(name, []), "--no-such-flag"])
        raise SystemExit(status)  # nas.latency returns its status instead of exiting
    assert exit_.value.code == 2
    one_line_error(capsys, name, "--no-such-flag")


@pytest.mark.parametrize("name, argv, fragment", [
    ("nas.search", ["--target-ms", "80", "--trials", "abc"], "--trials"),
    ("nas.summary", ["mobilenet_v1", "--input-size", "16"], "--input-size"),
    ("nas.train", ["a.yaml", "--epochs", "x"], "--epochs")])
def test_a_bad_or_missing_value_is_one_line_naming_the_flag(name, argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        TOOLS[name].main(argv)
    assert exit_.value.code == 2
    one_line_error(capsys, name, fragment)


@pytest.mark.parametrize("raised, status, line", [
    (KeyboardInterrupt, 130, "nas.latency: interrupted"),
    (Terminated, 143, "nas.latency: interrupted (SIGTERM)"),
    (None, 0, None)])
def test_ctrl_c_or_sigterm_ends_a_tool_with_one_line_and_the_shells_status(raised, status, line,
                                                                           capsys):
    # nas.latency measuring for minutes, then Ctrl-C: a KeyboardInterrupt traceback
    def main() -> int:
        if raised:
            raise raised
        return 0

    with pytest.raises(SystemExit) as exit_:
        run_tool(main, "nas.latency")
    assert exit_.value.code == status
    err = capsys.readouterr().err
    assert err.splitlines() == ([line] if line else [])


@pytest.mark.parametrize("env, expected", [({}, "10000"), ({"GOMP_SPINCOUNT": "500"}, "500")])
def test_the_tools_shorten_openmps_spin_wait_before_torch_loads_it(env, expected):
    # two trainings with a thread per core each ran 14x slower with libgomp's 300,000 spins
    # (benchmarks/oversubscription.py); libgomp reads the variable once, when torch loads it
    code = ("import nas.search, os, sys, torch; "
            "print(os.environ['GOMP_SPINCOUNT'], 'torch' in sys.modules)")
    clean = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, text=True,
                         capture_output=True, check=True).stdout.split()
    assert out == [expected, "True"]
    # ...and nothing imports torch before nas/__init__.py has set it
    order = subprocess.run([sys.executable, "-X", "importtime", "-c", "import nas.search"],
                           env=clean, text=True, capture_output=True, check=True).stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in order.splitlines()]
    assert imported.index("nas") < imported.index("torch")
