"""Searches sharing one study in a real PostgreSQL server.

.ci/run starts a throwaway server (initdb in a temporary folder, a free local port) and names it
in NAS_TEST_POSTGRES_URL; where none could be had, these tests are skipped with that reason in
the output (pytest -rs), never passed silently."""

import os
import signal
import subprocess
import sys
import time
import uuid
import warnings

import optuna
import pytest

from nas.search import main

URL = os.environ.get("NAS_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(
    not URL, reason="no PostgreSQL server: .ci/run starts one and sets NAS_TEST_POSTGRES_URL")

FAST = ["--space", "tiny", "--val-size", "30", "--proxy-images", "64", "--proxy-batch", "32",
        "--input-size", "32", "--latency-time", "0.1", "--target-ms", "1", "--proxy-epochs", "1",
        "--runtime", "eager", "--sampler", "random", "--latency-protocol", "single"]


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def argv(data, runs, name, *extra):
    return [*FAST, "--data", str(data), "--runs-dir", str(runs), "--name", name,
            "--storage", URL, *extra]


def spawn(args):
    return subprocess.Popen([sys.executable, "-m", "nas.search", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))


def study(name):
    return optuna.load_study(study_name=name, storage=URL)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_started_together_share_one_new_study(image_folder, tmp_path, processes):
    name, total = f"together-{uuid.uuid4().hex[:8]}", 6
    procs = [spawn(argv(image_folder, tmp_path, name, "--trials", str(total)))
             for _ in range(processes)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * processes, outs
    trials = study(name).trials
    # none lost: every trial finished; none duplicated: numbers are 0..n-1, each run by one
    # worker; the total is respected, give or take the trials other workers had in flight
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    assert all(t.state in FINISHED for t in trials), [
        (t.number, t.state, t.user_attrs.get("fail_reason")) for t in trials]
    assert total <= len(trials) <= total + processes - 1
    assert len({t.user_attrs["worker"] for t in trials}) >= 2  # the work was shared


def test_a_resume_on_another_cpu_model_is_refused(image_folder, tmp_path, capsys, monkeypatch):
    name = f"cpu-{uuid.uuid4().hex[:8]}"
    assert main(argv(image_folder, tmp_path, name, "--trials", "1")) == 0
    monkeypatch.setattr("nas.latency.cpu_name", lambda: "Another CPU (family 1 model 2, avx2)")
    assert main(argv(image_folder, tmp_path, name, "--trials", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency_device=" in err[-1] and "Another CPU" in err[-1]
    assert len(study(name).trials) == 1


@pytest.mark.skipif(not os.environ.get("NAS_TEST_PG_CTL"),
                    reason="needs .ci/run's server (pg_ctl, its data and log) to restart it")
def test_a_server_restart_mid_search_loses_no_finished_trial(image_folder, tmp_path):
    name = f"restart-{uuid.uuid4().hex[:8]}"
    proc = spawn(argv(image_folder, tmp_path, name, "--trials", "8", "--proxy-epochs", "3"))
    deadline = time.monotonic() + 300
    done = []
    while time.monotonic() < deadline and len(done) < 2:
        time.sleep(0.5)
        try:
            done = [t for t in study(name).trials
                    if t.state == optuna.trial.TrialState.COMPLETE]
        except KeyError:  # the search has not created the study yet
            continue
    before = {t.number: t.value for t in done}
    assert before, "no trial finished before the restart"
    subprocess.run(["runuser", "-u", "postgres", "--", os.environ["NAS_TEST_PG_CTL"], "-D",
                    os.environ["NAS_TEST_PG_DATA"], "-l", os.environ["NAS_TEST_PG_LOG"], "-m",
                    "fast", "-w", "restart"], check=True, capture_output=True, timeout=120)
    try:
        out = proc.communicate(timeout=600)[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
    after = {t.number: t.value for t in study(name).trials
             if t.state == optuna.trial.TrialState.COMPLETE}
    assert {n: after.get(n) for n in before} == before  # every finished trial is intact
    # what the search does: it goes on (exit 0) or stops with one line (exit 2), no traceback
    lines = out.strip().splitlines()
    assert proc.returncode in (0, 2) and "Traceback" not in out, out[-3000:]
    if proc.returncode == 2:
        assert lines[-1].startswith("nas.search: error: "), lines[-1]
    print(f"restart: exit {proc.returncode}, {len(after)} complete trials; last line: "
          f"{lines[-1] if lines else ''}")
    # and the same command resumes: the trial in flight is failed as its dead worker's
    finished = sum(t.state in FINISHED for t in study(name).trials)
    again = spawn(argv(image_folder, tmp_path, name, "--trials", str(finished + 1),
                       "--proxy-epochs", "3"))
    out = again.communicate(timeout=600)[0]
    assert again.returncode == 0, out[-3000:]
    states = [t.state for t in study(name).trials]
    assert optuna.trial.TrialState.RUNNING not in states
    assert sum(state in FINISHED for state in states) >= finished + 1


def test_a_worker_killed_with_sigkill_fails_only_its_trial_and_the_study_goes_on(
        image_folder, tmp_path):
    name = f"killed-{uuid.uuid4().hex[:8]}"
    # hard mode with T = 1 s: no tiny network is pruned on latency, and 8 epochs keep each
    # trial in training for seconds, so the kill lands inside one (tests/test_search.py)
    slow = ["--mode", "hard", "--target-ms", "1000", "--proxy-epochs", "8"]
    assert main(argv(image_folder, tmp_path, name, "--trials", "1", *slow)) == 0
    proc = spawn(argv(image_folder, tmp_path, name, "--trials", "3", *slow))

    def training() -> bool:
        trials = study(name).trials
        return (len(trials) > 1 and trials[-1].state == optuna.trial.TrialState.RUNNING
                and "latency_ms" in trials[-1].user_attrs)

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not training():
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    running = [t.number for t in study(name).trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1
    # the next command on this host finds the killed worker's trial, fails it, and goes on
    assert main(argv(image_folder, tmp_path, name, "--trials", "3", *slow)) == 0
    trials = study(name).trials
    killed = trials[running[0]]
    assert killed.state == optuna.trial.TrialState.FAIL
    assert killed.user_attrs["end"] == "died"
    assert sum(t.state in FINISHED for t in trials) == 3  # the killed one does not count


def test_a_worker_on_another_machine_that_goes_silent_is_failed_by_the_heartbeat():
    # the heartbeat covers workers elsewhere (a killed one here is found by its pid, above):
    # a trial stamped by another host whose heartbeat stops is failed after the grace period
    from nas.search.liveness import StampedStorage
    from nas.search.trial_end import counts_toward_trials

    name = f"silent-{uuid.uuid4().hex[:8]}"
    storage = StampedStorage(URL, heartbeat_interval=1, grace_period=2)
    s = optuna.create_study(study_name=name, storage=storage)
    trial = s.ask()
    s._storage.set_trial_user_attr(trial._trial_id, "worker", "elsewhere:123")
    storage.record_heartbeat(trial._trial_id)
    time.sleep(3)
    with warnings.catch_warnings():  # experimental in Optuna, and what optimize calls
        warnings.simplefilter("ignore")
        optuna.storages.fail_stale_trials(s)
    frozen = study(name).trials[0]
    assert frozen.state == optuna.trial.TrialState.FAIL
    assert not counts_toward_trials(frozen)  # another candidate is evaluated in its place
