"""Shared fixtures: a small learnable image folder made inside the tests."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from nas.interrupts import INTERRUPTED, STOP_SIGNALS

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """ImageFolder layout, 3 colour classes of noisy 32x32 images: 40 train + 10 test each."""
    root = tmp_path_factory.mktemp("synth")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("test", 10)):
        for c, colour in enumerate(COLOURS):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.array(colour)[None, None] + rng.normal(0, 40, (32, 32, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Decoded-data caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv("NAS_CACHE", str(tmp_path_factory.getbasetemp() / "nas-cache"))


@pytest.fixture(autouse=True)
def _no_interrupt_left_over(monkeypatch):
    """Each test starts uninterrupted, and a tool's stop-signal handlers end with the test."""
    monkeypatch.setattr(INTERRUPTED, "value", False)
    monkeypatch.setattr(INTERRUPTED, "signum", signal.SIGINT)
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    hook = sys.unraisablehook
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    sys.unraisablehook = hook


def sigterm_once(cmd: list[str], ready: Callable[[], bool], wait_s: float = 300
                 ) -> tuple[int, str, str]:
    """Run `cmd`, send it SIGTERM once `ready()` (or it ended, or wait_s passed); its status,
    stdout and stderr. The process never outlives the call."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        end = time.time() + wait_s
        while not ready() and proc.poll() is None and time.time() < end:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out, err


def one_line_error(capsys, tool: str, fragment: str) -> str:
    """The user-error standard: one stderr line from the tool, naming the flag or file."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"{tool}: error: ") and fragment in lines[0], lines[0]
    return lines[0]


# Tests that start real searches or trainings (they take the image folder or a fixture built
# on it), convert networks for a runtime (seconds each), or start Python subprocesses are
# marked slow: `python -m pytest -m "not slow"` is the quick inner loop; CI runs everything.
SLOW_FIXTURES = {"image_folder"}
SLOW_MODULES = {"test_runtimes.py", "test_latency_server.py"}
SLOW_SOURCE = ("sys.executable", "spawn(")


def pytest_collection_modifyitems(config, items):
    import inspect

    for item in items:
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if (SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name in
                SLOW_MODULES or any(s in source for s in SLOW_SOURCE)
                or item.get_closest_marker("integration")):
            item.add_marker(pytest.mark.slow)
