"""What every command-line tool shares: usage errors as one line, exit status 2; Ctrl-C and
SIGTERM as one line."""

import signal

import pytest
from conftest import one_line_error

from nas import export, latency, plot, search, summary, train
from nas.interrupts import on_sigint, run_tool

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
    (signal.SIGINT, 130, "nas.latency: interrupted"),
    (signal.SIGTERM, 143, "nas.latency: interrupted (SIGTERM)"),
    (None, 0, None)])
def test_ctrl_c_or_sigterm_ends_a_tool_with_one_line_and_the_shells_status(raised, status, line,
                                                                           capsys):
    # nas.latency measuring for minutes, then Ctrl-C: a KeyboardInterrupt traceback
    def main() -> int:
        if raised:
            on_sigint(raised, None)  # what the signal's handler does
        return 0

    with pytest.raises(SystemExit) as exit_:
        run_tool(main, "nas.latency")
    assert exit_.value.code == status
    err = capsys.readouterr().err
    assert err.splitlines() == ([line] if line else [])



def test_every_package_of_nas_is_shipped():
    # a subpackage missing from pyproject's list imports in an editable install and fails in
    # a built one (nas.samplers was, for one commit)
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "nas").rglob(
        "__init__.py")}
    assert found <= listed, sorted(found - listed)
