"""The search command end to end on a tiny space and synthetic data: results, resume, failures."""

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import types

import optuna
import pandas as pd
import pytest
import sqlalchemy
import sqlalchemy.orm
from conftest import one_line_error

import nas.search
from nas import export
from nas.arch import Architecture, load_architecture
from nas.cost import count_macs, count_params
from nas.files import sqlite_url
from nas.host import available_cpus
from nas.interleaved import WARM_RUNS_PER_BLOCK, protocol_name
from nas.interrupts import INTERRUPTED, on_sigint, was_interrupted
from nas.model import build_model
from nas.pareto import pareto_mask
from nas.proxy import CandidateFailed, ProxyBudget, proxy_train
from nas.reward import MODES, reward
from nas.runtimes import DEFAULT_RUNTIME
from nas.search import SearchConfig, main
from nas.search.baselines import run_baselines
from nas.search.config import config_from_argv
from nas.search.cpu_share import ThreadShare, train_threads, training_threads
from nas.search.liveness import (
    BASELINES_ATTR,
    fail_dead_local_trials,
    local_trainers,
    lower_dead_baselines_flags,
)
from nas.search.objective import Context, latency_bound_ms
from nas.search.study import open_storage, refusal, storage_for
from nas.search.trial_end import counts_toward_trials
from nas.search.workers import Workers

# eager latency: these tests are about the search, and converting each candidate for a
# deployment runtime costs seconds; the default runtime has its own tests below
FAST = ["--space", "tiny", "--val-size", "30", "--proxy-images", "64",
        "--proxy-batch", "32", "--input-size", "32", "--latency-time", "0.1", "--target-ms", "1",
        "--proxy-epochs", "1", "--runtime", "eager", "--latency-protocol", "single"]


def args(run_dir, data, *extra, name="s"):
    return [*FAST, "--data", str(data), "--runs-dir", str(run_dir), "--name", name, *extra]


def study_of(run_dir, name="s"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{run_dir / name / 'study.db'}")


def spawn(argv, env_extra=None, **popen):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-m", "nas.search", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, **popen)


@pytest.fixture(scope="module")
def finished_run(image_folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # T = 5 ms (mobilenet_v3_small at 32x32 took 6-9 ms per run on a Zen 3 VM)
    assert main(args(runs, image_folder, "--trials", "4", "--baselines", "mobilenet_v3_small",
                     "--sampler", "random", "--target-ms", "5")) == 0
    return runs / "s"


def test_results_files_hold_what_the_trials_measured(finished_run):
    trials = pd.read_csv(finished_run / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    assert len(trials) == 4 and len(done) >= 2
    # a trial may be pruned only as slower than a best whose reward it could not beat (on 30
    # validation images a candidate can score 1.0, and then every slower one is pruned)
    pruned = trials[trials.state != "COMPLETE"]
    assert (pruned.state == "PRUNED").all()
    assert all("even at accuracy 1" in str(r) for r in pruned.fail_reason)
    for _, row in done.iterrows():
        arch = Architecture.from_dict(json.loads(row.arch_dict))
        assert arch.to_str() == row.arch
        model = build_model(arch, num_classes=3)
        assert row.params == count_params(model)
        assert row.macs == count_macs(model, 32)
        assert row.reward == pytest.approx(reward(row.accuracy, row.latency_ms, 5.0,
                                                  alpha=-0.07, beta=-0.07))
        assert row.latency_p10_ms <= row.latency_ms <= row.latency_p90_ms
        assert 0 <= row.accuracy <= 1 and row.accuracy * 30 == pytest.approx(
            round(row.accuracy * 30))
    best = done.loc[done.reward.idxmax()]
    assert load_architecture(finished_run / "best.yaml").to_str() == best.arch
    front = pd.read_csv(finished_run / "pareto.csv")
    mask = pareto_mask(done.accuracy.to_numpy(), done.latency_ms.to_numpy())
    assert sorted(front.number) == sorted(done.number[mask])
    assert best.arch in (finished_run / "pareto.html").read_text()
    baselines = pd.read_csv(finished_run / "baselines.csv")
    assert list(baselines.baseline) == ["mobilenet_v3_small"]
    assert baselines.params[0] == count_params(
        build_model(load_architecture("mobilenet_v3_small"), num_classes=3))
    meta = json.loads((finished_run / "run.json").read_text())
    assert meta["settings"]["target_ms"] == 5.0 and meta["environment"]["torch"]



def test_end_of_search_summary_sets_the_baselines_beside_the_best_trial(finished_run, capsys):
    from nas.results import load_baselines
    from nas.search.runner import print_summary

    print_summary({"trials": finished_run / "trials.csv"}, target_ms=5.0, beta=-0.07,
                  baselines=load_baselines(finished_run))
    out = capsys.readouterr().out
    base = pd.read_csv(finished_run / "baselines.csv").iloc[0]
    trials = pd.read_csv(finished_run / "trials.csv")
    best = trials.loc[trials.reward.idxmax()]
    assert f"(best trial {best.number}: reward {best.reward:.4f}):" in out
    row = next(line for line in out.splitlines() if line.strip().startswith("mobilenet_v3_small"))
    assert f"{base.latency_ms:.2f} ms  acc {base.accuracy:.4f}  reward {base.reward:.4f}" in row
    assert ("above the best trial" in row) == (base.reward > best.reward)
    assert out.index("Baselines") < out.index("Results: ")
    # the numbers first and the architecture last, so a wrapped line keeps them aligned
    lines = out.splitlines()
    top = lines.index("Best trials:")
    assert lines[top + 1].split() == ["number", "latency_ms", "accuracy", "reward", "params",
                                      "macs", "arch"]
    assert lines[top + 2].rstrip().endswith(best.arch)

def test_resume_continues_with_finished_trials_intact(image_folder, tmp_path):
    assert main(args(tmp_path, image_folder, "--trials", "2", "--sampler", "random")) == 0
    first = {t.number: (t.state, t.params, t.user_attrs.get("arch"))
             for t in study_of(tmp_path).trials}
    # --threads 1 is the default spelled out: the same setting, so the resume is accepted.
    assert main(args(tmp_path, image_folder, "--trials", "4", "--sampler", "random",
                     "--threads", "1")) == 0
    after = study_of(tmp_path).trials
    assert len(after) == 4
    # A resumed sampler must not replay the first run's proposals.
    assert after[2].params != after[0].params and after[3].params != after[1].params
    assert {t.number: (t.state, t.params, t.user_attrs.get("arch"))
            for t in after[:2]} == first
    # Latency is measured once per architecture and study: the cache file holds each once.
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert len(cache["entries"]) == len({t.user_attrs["arch"] for t in after})


def test_resume_with_other_settings_is_refused(image_folder, tmp_path, capsys):
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    argv = args(tmp_path, image_folder, "--trials", "2")
    argv[argv.index("--target-ms") + 1] = "5"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "target_ms=1.0" in err[0] and "--name" in err[0]
    assert len(study_of(tmp_path).trials) == 1


def test_a_refused_start_leaves_no_empty_run_folder(image_folder, tmp_path, capsys):
    # the run folder was made before the study's settings were checked
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    argv = args(tmp_path / "other", image_folder, "--trials", "2", "--storage",
                sqlite_url(tmp_path / "s" / "study.db"))
    argv[argv.index("--target-ms") + 1] = "5"
    assert main(argv) == 2
    assert "target_ms=1.0" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_a_study_that_cannot_be_written_is_one_line(image_folder, tmp_path, capsys):
    # a read-only study.db (as another user); root ignores file modes, so SQLite's read-only
    # mode stands in for one. Optuna's StorageInternalError came out as a traceback
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    url = f"sqlite:///file:{tmp_path / 's' / 'study.db'}?mode=ro&uri=true"
    assert main(args(tmp_path, image_folder, "--trials", "2", "--storage", url)) == 2
    one_line_error(capsys, "nas.search", "cannot be written")
    assert len(study_of(tmp_path).trials) == 1


@pytest.mark.parametrize("problem", ["folder", "name"])
def test_a_run_folder_that_cannot_be_made_is_one_line(image_folder, tmp_path, capsys,
                                                      monkeypatch, problem):
    if problem == "folder":  # a folder without write permission (as another user than root)
        def refused(folder):
            raise PermissionError(13, "Permission denied", str(folder))

        monkeypatch.setattr("nas.search.runner.make_folders", refused)
        assert main(args(tmp_path, image_folder, "--trials", "1")) == 2
        one_line_error(capsys, "nas.search", "cannot make the run folder")
    else:  # the file system's limit is 255 bytes: 'File name too long' came as a traceback
        assert main(args(tmp_path, image_folder, "--trials", "1", name="n" * 256)) == 2
        one_line_error(capsys, "nas.search", "at most 255 bytes")
    assert list(tmp_path.iterdir()) == []


def test_resume_refuses_a_study_that_asked_a_parameter_from_other_choices(
        image_folder, tmp_path, capsys, monkeypatch):
    # As if another nas version had rounded widths to multiples of 4: the space file, and so
    # the settings, are the same, but block 2 asked its width from other values. Optuna's
    # storage refuses a second value space under one name, so each new trial would fail.
    monkeypatch.setattr("nas.space.FILTER_DIVISOR", 4)
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert main(args(tmp_path, image_folder, "--trials", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trial 0 asked b2_filters from [12, 16, 20]" in err[0]
    assert "asks it from [16, 24]" in err[0] and "--name" in err[0]
    assert len(study_of(tmp_path).trials) == 1


@pytest.mark.parametrize("sampler", ["gp", "tpe"])  # the default, and the default before it
def test_resume_of_a_study_with_the_old_width_parameter_goes_on(image_folder, tmp_path, sampler):
    # Before the width parameter was b<i>_filters, it was b<i>_filters_mult over the listed
    # multipliers; such a study resumes, and the sampler (past its one start-up trial)
    # proposes from it. A trial may be pruned (latency bound), none may fail.
    run = ["--startup-trials", "1", "--sampler", sampler]
    assert main(args(tmp_path, image_folder, "--trials", "1", *run)) == 0
    dist = optuna.distributions.CategoricalDistribution((0.75, 1.0, 1.25))
    study_of(tmp_path).add_trial(optuna.trial.create_trial(
        params={"b2_filters_mult": 0.75}, distributions={"b2_filters_mult": dist}, value=0.1))
    assert main(args(tmp_path, image_folder, "--trials", "4", *run)) == 0
    trials = study_of(tmp_path).trials
    assert len(trials) == 4 and not any(t.state.name == "FAIL" for t in trials)
    assert all("b2_filters" in t.params for t in trials[2:])


def test_resume_with_another_proxy_budget_names_the_flag_that_restores_it(image_folder, tmp_path,
                                                                          capsys):
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    argv = args(tmp_path, image_folder, "--trials", "2")
    argv[argv.index("--proxy-images") + 1] = "96"  # as when the default budget changes
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train_images=64, not 96" in err[0]
    assert "resume with --proxy-images 64" in err[0]
    assert len(study_of(tmp_path).trials) == 1


def test_a_study_from_before_ghost_batches_resumes_as_one_part_per_batch(image_folder, tmp_path,
                                                                         capsys):
    one, two = ["--proxy-ghost-batches", "1"], ["--proxy-ghost-batches", "2"]
    assert main(args(tmp_path, image_folder, "--trials", "1", *one)) == 0
    study = study_of(tmp_path)  # as a study saved before the field existed
    settings = study.user_attrs["settings"]
    assert settings["budget"].pop("ghost_batches") == 1
    study.set_user_attr("settings", settings)
    assert main(args(tmp_path, image_folder, "--trials", "2", *two)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ghost_batches=1, not 2" in err[0]
    assert "resume with --proxy-ghost-batches 1" in err[0]
    assert main(args(tmp_path, image_folder, "--trials", "2", *one)) == 0
    assert len(study_of(tmp_path).trials) == 2


def test_a_study_of_the_default_before_ghost_batches_is_told_the_flags_that_resume_it():
    from nas.search.study import with_later_fields

    before = dataclasses.asdict(ProxyBudget(train_images=8000, batch_size=64, ghost_batches=1,
                                            lr=2e-3, optimizer="adamw", weight_decay=0.05))
    del before["ghost_batches"], before["optimizer"]  # stored before the fields existed
    msg = refusal("s", "budget", with_later_fields(before), dataclasses.asdict(ProxyBudget()))
    # AdamW is the default again: only the fields that differ from it are named
    assert "resume with --proxy-batch 64 --proxy-ghost-batches 1 --proxy-lr 0.002 or pick" in msg
    sgd = dataclasses.asdict(ProxyBudget(optimizer="sgd", lr=0.1, weight_decay=5e-4))
    msg = refusal("s", "budget", with_later_fields(before), sgd)  # under the SGD default
    assert ("resume with --proxy-batch 64 --proxy-ghost-batches 1 --proxy-lr 0.002 "
            "--proxy-optimizer adamw --proxy-weight-decay 0.05 or pick") in msg


def test_a_study_of_the_adamw_proxy_from_before_the_field_resumes_under_the_default():
    from nas.search.study import with_later_fields

    before = dataclasses.asdict(ProxyBudget(optimizer="adamw", lr=3e-3, weight_decay=0.05))
    del before["optimizer"]  # stored before the field existed: every such study used AdamW
    assert with_later_fields(before) == dataclasses.asdict(ProxyBudget())


def test_a_study_of_the_sgd_proxy_default_is_told_the_flags_that_resume_it():
    # the default of 2026-12-05 and 12-06 (CHANGELOG)
    before = dataclasses.asdict(ProxyBudget(optimizer="sgd", lr=0.1, weight_decay=5e-4))
    msg = refusal("s", "budget", before, dataclasses.asdict(ProxyBudget()))
    assert ("resume with --proxy-lr 0.1 --proxy-optimizer sgd --proxy-weight-decay 0.0005 "
            "or pick") in msg


def test_a_study_from_before_proxy_clipping_resumes_unclipped_and_is_told_the_flag():
    from nas.search.study import with_later_fields

    before = dataclasses.asdict(ProxyBudget())
    del before["clip_grad"]  # stored before the field existed: every such study was unclipped
    assert with_later_fields(before) == dataclasses.asdict(ProxyBudget(clip_grad=None))
    msg = refusal("s", "budget", with_later_fields(before),
                  dataclasses.asdict(ProxyBudget(clip_grad=1.0)))
    assert "clip_grad=None, not 1.0; resume with --proxy-clip-grad 0 or pick" in msg


def test_proxy_clip_grad_flag_reaches_the_budget_and_0_means_unclipped():
    b = config_from_argv(["--target-ms", "5", "--proxy-clip-grad", "2"]).budget()
    assert b.clip_grad == 2.0
    assert config_from_argv(["--target-ms", "5", "--proxy-clip-grad", "0"]).budget().clip_grad \
        is None


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_bad_proxy_clip_grad_is_a_one_line_error(value):
    from nas.search.config import UsageError, resolve

    with pytest.raises(UsageError, match=f"--proxy-clip-grad {value}: must be a finite number > "
                                         "0, or 0 for no clipping"):
        resolve(config_from_argv(["--target-ms", "5", "--proxy-clip-grad", value]))


def test_the_proxy_optimizer_brings_its_own_learning_rate_and_weight_decay():
    from nas.proxy import OPTIMIZER_DEFAULTS

    for name, own in OPTIMIZER_DEFAULTS.items():
        b = config_from_argv(["--target-ms", "5", "--proxy-optimizer", name]).budget()
        assert (b.optimizer, b.lr, b.weight_decay) == (name, own["lr"], own["weight_decay"])
    b = config_from_argv(["--target-ms", "5", "--proxy-optimizer", "sgd", "--proxy-lr", "0.05",
                          "--proxy-weight-decay", "0"]).budget()
    assert (b.optimizer, b.lr, b.weight_decay) == ("sgd", 0.05, 0.0)


def test_every_differing_budget_field_is_named_and_flags_only_if_they_restore_it():
    default = dataclasses.asdict(ProxyBudget())
    was = dataclasses.asdict(ProxyBudget(train_images=16000, lr=1e-3, val_images=1000))
    msg = refusal("s", "budget", was, default)
    assert "resume with --proxy-images 16000 --proxy-lr 0.001 --val-size 1000" in msg
    msg = refusal("s", "budget", dataclasses.asdict(ProxyBudget(epochs=3, warmup=0.1)), default)
    assert "epochs=3, not 2" in msg and "warmup=0.1, not 0.2" in msg  # warmup has no flag
    assert "resume with" not in msg and "--name" in msg


def test_resume_on_another_cpu_model_is_refused_but_an_older_study_is_not(
        image_folder, tmp_path, capsys, monkeypatch):
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    monkeypatch.setattr("nas.latency.cpu_name", lambda: "AMD EPYC (family 25 model 17, avx512f)")
    assert main(args(tmp_path, image_folder, "--trials", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency_device=" in err[0] and "model 17" in err[0]
    assert len(study_of(tmp_path).trials) == 1
    study = study_of(tmp_path)  # a study saved before latency_device existed still resumes
    study.set_user_attr("settings", {k: v for k, v in study.user_attrs["settings"].items()
                                     if k != "latency_device"})
    assert main(args(tmp_path, image_folder, "--trials", "2")) == 0
    assert len(study_of(tmp_path).trials) == 2


def test_a_study_on_an_archive_resumes_from_a_copy_and_from_its_former_fingerprint(
        image_folder, tmp_path, capsys):
    """The data's fingerprint is the archive's bytes: a re-provisioned copy (new mtime) resumes;
    a study recorded with the former path-and-mtime fingerprint resumes and is upgraded; other
    data is still refused."""
    import hashlib
    import tarfile

    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(image_folder, arcname="d")
    assert main(args(tmp_path, archive, "--trials", "1")) == 0
    content_fp = study_of(tmp_path).user_attrs["settings"]["data_fingerprint"]
    st = archive.stat()
    former = hashlib.sha256(f"v1\n{archive}\n{st.st_size}\n{st.st_mtime_ns}".encode()).hexdigest()
    study = study_of(tmp_path)
    study.set_user_attr("settings", {**study.user_attrs["settings"], "data_fingerprint": former})
    refused = args(tmp_path, archive, "--trials", "2")
    refused[refused.index("--target-ms") + 1] = "2"
    assert main(refused) == 2  # refused for its target: nothing upgraded, nothing written
    assert study_of(tmp_path).user_attrs["settings"]["data_fingerprint"] == former
    assert main(args(tmp_path, archive, "--trials", "2")) == 0
    assert study_of(tmp_path).user_attrs["settings"]["data_fingerprint"] == content_fp
    archive.write_bytes(archive.read_bytes())  # re-provisioned: same bytes, a new mtime
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert main(args(tmp_path, archive, "--trials", "3")) == 0
    assert len(study_of(tmp_path).trials) == 3
    with tarfile.open(archive, "w") as tar:  # other data: refused in one line
        tar.add(image_folder / "train", arcname="d/train")
        tar.add(image_folder / "test", arcname="d/test")
        tar.add(image_folder / "test" / "class0", arcname="d/train/class0/more")
    capsys.readouterr()
    assert main(args(tmp_path, archive, "--trials", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data_fingerprint=" in err[0]


def test_a_search_measures_in_the_default_runtime_and_records_it(image_folder, tmp_path):
    argv = args(tmp_path, image_folder, "--trials", "2", "--sampler", "random")
    argv.remove("--runtime"), argv.remove("eager")
    assert main(argv) == 0
    study = study_of(tmp_path)
    assert study.user_attrs["settings"]["runtime"] == DEFAULT_RUNTIME
    assert study.user_attrs["settings"]["precision"] == "fp32"
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.user_attrs["convert_s"] > 0 for t in done)
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert {e["result"]["runtime"] for e in cache["entries"]} == {DEFAULT_RUNTIME}
    # the plot says what the latencies were measured in
    assert f"latency (ms, median; {DEFAULT_RUNTIME} fp32)" in (
        tmp_path / "s" / "pareto.html").read_text()


def test_an_int8_search_quantizes_each_candidate(image_folder, tmp_path):
    argv = args(tmp_path, image_folder, "--trials", "1", "--sampler", "random")
    argv[argv.index("eager")] = "onnxruntime"
    assert main([*argv, "--precision", "int8"]) == 0
    (trial,) = study_of(tmp_path).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE, trial.user_attrs.get("fail_reason")
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert [e["result"]["precision"] for e in cache["entries"]] == ["int8"]


def test_a_candidate_the_runtime_cannot_convert_fails_its_trial_and_the_search_goes_on(
        image_folder, tmp_path, monkeypatch):
    from nas.runtimes.onnx_runtime import OnnxRuntime

    real, calls = OnnxRuntime.convert, []

    def refuse_the_first(self, *a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("Unsupported operator 'aten::weird'\n(and a long trace)")
        return real(self, *a, **kw)

    monkeypatch.setattr(OnnxRuntime, "convert", refuse_the_first)
    argv = args(tmp_path, image_folder, "--trials", "2", "--sampler", "random")
    argv[argv.index("eager")] = "onnxruntime"
    assert main(argv) == 0
    first, second = study_of(tmp_path).trials
    assert first.state == optuna.trial.TrialState.FAIL and first.user_attrs["end"] == "failed"
    assert first.user_attrs["fail_reason"] == (
        "ConversionError: onnxruntime could not convert the network: RuntimeError: "
        "Unsupported operator 'aten::weird'")
    assert second.state == optuna.trial.TrialState.COMPLETE


def test_a_database_url_whose_driver_is_missing_names_the_extra(image_folder, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if not installed: import fails
    assert main(args(tmp_path, image_folder, "--storage", "postgresql://u:p@127.0.0.1:9/db")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nas.search: error: --storage postgresql://u:p@127.0.0.1:9/db: the postgresql "
                   "driver (psycopg 3) is not installed; pip install -e \".[postgres]\""]
    assert not (tmp_path / "s").exists()


def test_driver_hints_name_the_extra_and_the_url_form():
    assert "pip install -e \".[mysql]\" and write the URL as mysql+pymysql://" in (
        nas.search.study.driver_hint("mysql://u@h/db"))
    assert "cockroachdb://" in nas.search.study.driver_hint("cockroachdb://u@h/db")


def test_an_older_study_resumed_with_the_other_objective_is_refused_in_one_line(
        image_folder, tmp_path, capsys):
    assert main(args(tmp_path, image_folder, "--trials", "1", "--objective", "pareto",
                     "--sampler", "random")) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 's' / 'study.db'}")
    study_id = storage.get_study_id_from_name("s")
    storage.set_study_system_attr(study_id, "study:metric_names", None)  # as before names
    assert main(args(tmp_path, image_folder, "--trials", "2")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "objective='pareto', not 'reward'" in err[0], err


@pytest.mark.parametrize("objective, names", [("reward", ["reward"]),
                                              ("pareto", ["accuracy", "latency_ms"])])
def test_studies_name_their_metrics_for_the_dashboard(image_folder, tmp_path, objective, names):
    argv = args(tmp_path, image_folder, "--trials", "1", "--objective", objective,
                "--sampler", "random")
    assert main(argv) == 0
    assert study_of(tmp_path).metric_names == names


def test_a_study_from_before_runtimes_resumes_only_as_eager(image_folder, tmp_path, capsys):
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    study = study_of(tmp_path)  # as saved before 2026-12-05: eager, no runtime setting
    study.set_user_attr("settings", {k: v for k, v in study.user_attrs["settings"].items()
                                     if k not in ("runtime", "precision", "latency_protocol")})
    argv = args(tmp_path, image_folder, "--trials", "2")
    argv[argv.index("eager")] = "onnxruntime"
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nas.search: error: study 's' measured latency with runtime 'eager', not "
                   "'onnxruntime'; resume with --runtime eager or pick a new --name"]
    assert main(args(tmp_path, image_folder, "--trials", "2")) == 0
    assert len(study_of(tmp_path).trials) == 2


def test_an_architecture_evaluated_before_gets_its_result_without_training(
        image_folder, tmp_path, monkeypatch):
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    first = study_of(tmp_path).trials[0]
    for _ in range(2):
        study_of(tmp_path).enqueue_trial(first.params)

    def no_training(*a, **k):
        raise AssertionError("trained an architecture the study had evaluated")

    monkeypatch.setattr("nas.search.objective.proxy_train", no_training)
    assert main(args(tmp_path, image_folder, "--trials", "3")) == 0
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    for t in trials[1:]:
        assert t.user_attrs["reused_from"] == 0 and t.user_attrs["train_s"] == 0.0
        assert t.value == first.value
        assert t.user_attrs["accuracy"] == first.user_attrs["accuracy"]
        assert t.user_attrs["arch_dict"] == first.user_attrs["arch_dict"]
    df = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert df.reused_from.tolist()[1:] == [0, 0] and math.isnan(df.reused_from[0])
    # another architecture is trained: here, with training refused, its trial fails
    other = {k: v for k, v in first.params.items()}
    key = next(k for k in other if k.endswith("kernel"))
    other[key] = next(c for c in trials[0].distributions[key].choices if c != other[key])
    study_of(tmp_path).enqueue_trial(other)
    assert main(args(tmp_path, image_folder, "--trials", "4")) == 0
    fourth = study_of(tmp_path).trials[3]  # failed, or pruned on latency before training
    assert "reused_from" not in fourth.user_attrs
    assert fourth.state != optuna.trial.TrialState.COMPLETE


def test_failing_candidate_fails_its_trial_and_the_search_goes_on(image_folder, tmp_path):
    assert main(args(tmp_path, image_folder, "--trials", "2", "--proxy-lr", "1e30",
                     "--proxy-epochs", "3")) == 0
    trials = study_of(tmp_path).trials
    assert len(trials) == 2
    assert all(t.state == optuna.trial.TrialState.FAIL for t in trials)
    assert all("non-finite training loss" in t.user_attrs["fail_reason"] for t in trials)
    df = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert df.fail_reason.str.contains("non-finite").all()


@pytest.mark.parametrize("flag, value, fragment", [
    ("--target-ms", "-3", "--target-ms -3: must be a finite number > 0"),
    ("--target-ms", "nan", "--target-ms nan: must be a finite number > 0"),  # NaN <= 0 is False
    ("--proxy-lr", "nan", "--proxy-lr nan"),
    ("--proxy-weight-decay", "-1", "--proxy-weight-decay -1: must be a finite number >= 0"),
    ("--latency-time", "inf", "--latency-time inf"),
    ("--timeout", "-5", "--timeout -5"),
    ("--seed", "-1", "--seed -1: must be from 0 to 4294967295"),
    ("--latency-warm-runs", "-1", "--latency-warm-runs -1: must be from 0 to 16"),
    ("--population", "1", "--population 1: NSGA-II and evolution need at least 2"),
    ("--threads", str(available_cpus() + 1), "may use only"),
    ("--trials", "0", "--trials 0: must be >= 1"),
    ("--workers", "0", "--workers 0: must be >= 1"),
    ("--space", "nope", "nope"),
    ("--baselines", "mobilenet_v9", "mobilenet_v9"),
    ("--baselines", "mobilenet_v2@abc", "width multiplier 'abc' must be a number"),
    ("--data", "/does/not/exist", "/does/not/exist"),
    ("--alpha", "0.5", "alpha"),
    ("--proxy-batch", "128", "--proxy-batch 128: must be <= --proxy-images 64"),
    ("--val-size", "100", "--proxy-batch 32: must be <= the 20 training images"),
    ("--val-size", "120", "--val-size 120: must be from 1 to 119 (the data has 120 training"),
    ("--val-size", "200", "--val-size 200: must be from 1 to 119"),
    ("--threads", "0", "--threads 0"),
    ("--proxy-final-map", "0", "--proxy-final-map 0: must be >= 1"),
    ("--proxy-ghost-batches", "0", "--proxy-ghost-batches 0: must be >= 1"),
    ("--proxy-ghost-batches", "3", "--proxy-ghost-batches 3: must divide --proxy-batch 32"),
    ("--storage", "nosuchdb://x", "--storage nosuchdb://x"),
])
def test_bad_flags_are_one_line_and_write_nothing(image_folder, tmp_path, capsys, flag, value,
                                                  fragment):
    argv = args(tmp_path, image_folder, "--trials", "1")
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nas.search: error:") and fragment in err[0]
    assert not (tmp_path / "s").exists()


def test_evolution_searches_the_reward_and_refuses_pareto(image_folder, tmp_path, capsys):
    # population 2: trials 0 and 1 are random, and every later trial names its parent, one of
    # the two newest trials that finished with a value before it asked (a trial stopped at its
    # latency bound is no parent)
    assert main(args(tmp_path, image_folder, "--trials", "5", "--sampler", "evolution",
                     "--population", "2")) == 0
    trials = study_of(tmp_path).trials
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"]["sampler"] == \
        "evolution"
    parents = [t.system_attrs.get("evolution:parent") for t in trials]
    assert parents[:2] == [None, None] and len(trials) >= 5
    for t, parent in zip(trials[2:], parents[2:], strict=True):
        newest = [u.number for u in trials[:t.number] if u.state.name == "COMPLETE"][-2:]
        assert parent in newest
    capsys.readouterr()
    argv = args(tmp_path, image_folder, "--trials", "1", "--sampler", "evolution",
                "--objective", "pareto", name="p")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sampler evolution is single-objective" in err[0]
    assert not (tmp_path / "p").exists()


def test_gp_sampler_searches_past_its_start_up_trials(image_folder, tmp_path):
    # one random trial, then Optuna's GP proposes (its conditional parameters independently)
    assert main(args(tmp_path, image_folder, "--trials", "3", "--sampler", "gp",
                     "--startup-trials", "1")) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"]["sampler"] == "gp"
    trials = study_of(tmp_path).trials
    assert len(trials) == 3 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["arch"] for t in trials}) >= 2


def test_bad_space_file_names_the_field(image_folder, tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text("blocks:\n- {filters: 8, repeats: 1, stride: 1, choices: {op: [mbconv], "
                     "kernel: [4], expansion: [3]}}\n")
    argv = args(tmp_path, image_folder, "--trials", "1")
    argv[argv.index("--space") + 1] = str(space)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(space) in err and "kernel" in err and "Traceback" not in err


def test_cuda_without_gpu_is_a_clear_error(image_folder, tmp_path, capsys):
    pytest.importorskip("torch")
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(args(tmp_path, image_folder, "--trials", "1", "--device", "cuda")) == 2
    assert "--device cuda: no CUDA GPU" in capsys.readouterr().err
    assert main(args(tmp_path, image_folder, "--trials", "1", "--train-device", "cuda:1")) == 2
    assert "--train-device cuda:1: no CUDA GPU" in capsys.readouterr().err


def test_runs_dir_under_a_file_is_a_one_line_error(image_folder, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    argv = args(tmp_path, image_folder, "--trials", "1")
    argv[argv.index("--runs-dir") + 1] = str(blocker / "runs")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{blocker} is a file" in err[0] and "--runs-dir" in err[0]
    assert blocker.read_text() == "" and sorted(tmp_path.iterdir()) == [blocker]


def _wait_for(predicate, timeout=120):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def _states(run_dir):
    try:
        return [t.state for t in study_of(run_dir).trials]
    except Exception:  # the study may not exist yet
        return []


def _one_done_one_training(run_dir) -> bool:
    try:  # one read: two could straddle a trial's end
        trials = study_of(run_dir).trials
    except Exception:  # the study may not exist yet
        return False
    return (sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) >= 1
            and trials[-1].state == optuna.trial.TrialState.RUNNING
            and "latency_ms" in trials[-1].user_attrs)  # past latency: now in training


def _long_trials(tmp_path, image_folder) -> list[str]:
    """Trials that spend seconds in training and are never pruned on latency (hard mode,
    T = 1 s): a signal sent once one is training lands inside it."""
    argv = args(tmp_path, image_folder, "--trials", "50", "--mode", "hard")
    argv[argv.index("--proxy-epochs") + 1] = "8"
    argv[argv.index("--target-ms") + 1] = "1000"
    return argv


def test_killed_worker_leaves_finished_trials_intact(image_folder, tmp_path):
    # The kill must land inside a trial. A trial still measuring latency can be pruned a moment
    # later (CI failed on that once); in hard mode with T = 1 s no tiny network is pruned on
    # latency, and 8 epochs keep it in training for seconds.
    argv = _long_trials(tmp_path, image_folder)
    proc = spawn(argv)
    try:
        assert _wait_for(lambda: _one_done_one_training(tmp_path))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    trials = study_of(tmp_path).trials
    before = {t.number: (t.state, t.user_attrs.get("accuracy")) for t in trials
              if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(running) == 1
    argv[argv.index("--trials") + 1] = str(len(trials) + 1)
    assert main(argv) == 0
    trials = study_of(tmp_path).trials
    assert {t.number: (t.state, t.user_attrs.get("accuracy")) for t in trials
            if t.number in before} == before
    killed = [t for t in trials if "died" in t.user_attrs.get("fail_reason", "")]
    assert [t.number for t in killed] == running
    assert killed[0].state == optuna.trial.TrialState.FAIL
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def _open_at_the_barrier(run_dir, barrier, results) -> None:
    barrier.wait()
    try:
        open_storage(SearchConfig(target_ms=1, storage=None), run_dir)
        results.put("ok")
    except Exception as e:  # noqa: BLE001 - reported to the test
        results.put(f"{type(e).__name__}: {e}")


def test_workers_starting_together_on_a_new_study_all_open_it(tmp_path):
    # Optuna creates the tables unguarded (optuna#1092): with plain RDBStorage, 4 processes
    # released by one barrier failed with 'table ... already exists' or a duplicate
    # alembic_version in 7 rounds of 10 here. The race also failed a worker test once.
    fork = multiprocessing.get_context("fork")  # this process's imports: the race stays tight
    for round_ in range(4):
        run_dir = tmp_path / str(round_)
        run_dir.mkdir()
        barrier, results = fork.Barrier(4), fork.Queue()
        procs = [fork.Process(target=_open_at_the_barrier, args=(run_dir, barrier, results))
                 for _ in range(4)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join()
        assert outcomes == ["ok"] * 4, (round_, outcomes)


def _archs(run_dir, name):
    return [t.user_attrs["arch"] for t in study_of(run_dir, name).trials]


def test_a_study_found_just_created_and_empty_is_not_sampled_with_its_creators_seed(
        image_folder, tmp_path):
    # A second command started at the same moment as the first finds the study made and empty;
    # seeded with the same --seed it proposed the very architectures the first one did.
    for name in ("made", "again"):  # a study this run creates: --seed, reproducible
        assert main(args(tmp_path, image_folder, "--trials", "3", "--sampler", "random",
                         name=name)) == 0
    assert _archs(tmp_path, "made") == _archs(tmp_path, "again")
    (tmp_path / "joined").mkdir()
    optuna.create_study(study_name="joined", storage=f"sqlite:///{tmp_path / 'joined/study.db'}",
                        direction="maximize")  # what the other command had just done
    assert main(args(tmp_path, image_folder, "--trials", "3", "--sampler", "random",
                     name="joined")) == 0
    joined = _archs(tmp_path, "joined")
    assert len(joined) == 3 and len(set(joined) & set(_archs(tmp_path, "made"))) <= 1


def test_two_workers_share_one_study(image_folder, tmp_path):
    # Create the study first so both workers resume it rather than racing to create it.
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 0
    # The very same command twice, as the README says: same --seed.
    procs = [spawn(args(tmp_path, image_folder, "--trials", "7", "--sampler", "random"))
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trials = study_of(tmp_path).trials
    numbers = [t.number for t in trials]
    assert numbers == list(range(len(trials))) and len(trials) >= 7
    assert all(t.state.is_finished() for t in trials)
    # Both workers did some of the work, and no trial was recorded twice.
    workers = {t.user_attrs["worker"].split(":")[1] for t in trials[1:]}
    assert len(workers) == 2
    # ...and the two workers did not propose the same architectures.
    archs = [t.user_attrs["arch"] for t in trials[1:]]
    assert len(set(archs)) >= len(archs) - 1
    df = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert sorted(df.number) == numbers


def test_a_run_name_with_url_characters_keeps_its_study_in_its_folder(image_folder, tmp_path):
    # in an unescaped sqlite:/// URL, '?' and '#' end the path (the study went to runs/q, outside
    # the run folder) and '%41' is decoded ('unable to open database file')
    name = "q?x#1%41"
    assert main(args(tmp_path, image_folder, "--trials", "1", name=name)) == 0
    assert [p.name for p in tmp_path.iterdir()] == [name]
    study = optuna.load_study(study_name=name, storage=sqlite_url(tmp_path / name / "study.db"))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]
    assert export.main([str(tmp_path / name), "-o", str(tmp_path / name / "a.yaml")]) == 0
    assert load_architecture(tmp_path / name / "a.yaml").to_str() == study.trials[0].user_attrs[
        "arch"]


def test_workers_flag_runs_processes_that_share_a_fresh_study(image_folder, tmp_path):
    assert main(args(tmp_path, image_folder, "--trials", "6", "--workers", "2",
                     "--sampler", "random")) == 0
    trials = study_of(tmp_path).trials
    assert len(trials) >= 6 and all(t.state.is_finished() for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both processes evaluated
    archs = [t.user_attrs["arch"] for t in trials]
    assert len(set(archs)) >= len(archs) - 1  # differently seeded, not the same proposals
    df = pd.read_csv(tmp_path / "s" / "trials.csv")  # written after every worker finished
    assert sorted(df.number) == [t.number for t in trials]


def test_the_default_gp_sampler_proposes_with_two_workers_past_its_start_up(image_folder,
                                                                           tmp_path):
    # past one start-up trial GP proposes while the other worker's trial runs (Optuna's q-batch
    # path); every trial finishes. (Which process proposes how many, and whether GP repeats an
    # architecture, depends on timing and is not asserted.)
    assert main(args(tmp_path, image_folder, "--trials", "6", "--workers", "2",
                     "--startup-trials", "1")) == 0
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"]["sampler"] == "gp"
    trials = study_of(tmp_path).trials
    assert len(trials) >= 6 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


@pytest.mark.parametrize("to, sig", [("first process", signal.SIGINT),
                                     ("process group", signal.SIGINT),
                                     ("first process", signal.SIGTERM)],
                         ids=["kill -INT", "Ctrl-C", "kill -TERM"])
def test_interrupting_a_run_with_workers_stops_them_all(image_folder, tmp_path, to, sig):
    # `kill -INT` of the first process, Ctrl-C in a terminal (the whole group), or `kill` (the
    # first process passes the SIGTERM on). Stops in ~3 s; before the fix of the read lock an
    # interrupt, in about 1 run in 8, left the study locked and the run took ~2 minutes
    # (test_an_interrupt_in_the_middle_of_a_read...)
    proc = spawn(args(tmp_path, image_folder, "--trials", "200", "--workers", "2"),
                 start_new_session=True)
    try:
        if not _wait_for(lambda: _states(tmp_path).count(optuna.trial.TrialState.COMPLETE) >= 3):
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"not 3 finished trials in 120 s: {_states(tmp_path)}; output:\n"
                        f"{proc.communicate()[0]}")
        if to == "first process":
            proc.send_signal(sig)
        else:
            os.killpg(proc.pid, sig)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # the workers too
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 128 + sig and "Traceback" not in out, out
    assert out.count("interrupted: writing results") == 1, out  # the worker writes none
    states = _states(tmp_path)
    assert optuna.trial.TrialState.RUNNING not in states and len(states) < 200
    reasons = {t.user_attrs.get("fail_reason") for t in study_of(tmp_path).trials
               if t.state == optuna.trial.TrialState.FAIL}  # both workers' trials in flight
    assert reasons <= {"interrupted (Ctrl-C)" if sig == signal.SIGINT
                       else "interrupted (SIGTERM)"}, reasons
    assert (pd.read_csv(tmp_path / "s" / "trials.csv").state == "COMPLETE").sum() >= 3


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["SIGINT", "SIGTERM"])
def test_an_interrupt_while_opening_the_study_is_one_line(image_folder, tmp_path, monkeypatch,
                                                          capsys, sig, status):
    # Ctrl-C or kill in the first seconds (data, storage) printed a KeyboardInterrupt traceback
    monkeypatch.setattr(INTERRUPTED, "value", False)
    monkeypatch.setattr(INTERRUPTED, "signum", signal.SIGINT)

    def interrupted(*a, **kw):
        INTERRUPTED.set(sig)
        raise KeyboardInterrupt

    monkeypatch.setattr("nas.search.runner.open_storage", interrupted)
    assert main(args(tmp_path, image_folder, "--trials", "3")) == status
    err = capsys.readouterr().err
    assert err == ("nas.search: interrupted; the study keeps every finished trial, and the same "
                   "command resumes it\n")


def test_an_interrupt_inside_a_finalizer_prints_no_traceback(monkeypatch, capsys):
    # Ctrl-C to a --workers search once printed 'Exception ignored in: <bound method
    # InstanceState._cleanup ...>' and a traceback: the handler's KeyboardInterrupt landed in a
    # weakref callback of SQLAlchemy's, which Python can only print; the flag stops the search
    import gc
    import weakref

    from nas.interrupts import quiet_interrupts

    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(sys, "unraisablehook", quiet_interrupts(sys.unraisablehook))
    monkeypatch.setattr(INTERRUPTED, "value", False)

    class Session:
        pass

    def finalize(raised: type[BaseException]) -> None:
        def callback(ref):
            raise raised("in a finalizer")

        obj = Session()
        ref = weakref.ref(obj, callback)  # noqa: F841 (kept alive until obj goes)
        del obj
        gc.collect()

    finalize(KeyboardInterrupt)  # not ours (no signal came): Python's own report
    assert "KeyboardInterrupt: in a finalizer" in capsys.readouterr().err
    INTERRUPTED.set(signal.SIGINT)
    finalize(KeyboardInterrupt)
    assert capsys.readouterr().err == ""
    finalize(ValueError)  # any other error in a finalizer is still reported
    assert "ValueError: in a finalizer" in capsys.readouterr().err


def test_a_swallowed_interrupt_still_stops_the_training_at_its_next_step(monkeypatch):
    from nas.search.cpu_share import stop_if_interrupted

    monkeypatch.setattr(INTERRUPTED, "value", False)
    ask = stop_if_interrupted(lambda: 2)
    assert ask() == 2
    INTERRUPTED.set(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        ask()


def test_an_error_optuna_raises_while_interrupted_still_counts_as_the_interrupt(monkeypatch):
    # optuna 5.0's tell turns a KeyboardInterrupt landing in its session.close() into an
    # UnboundLocalError; the SIGINT handler's flag keeps that an interrupt, not a crash
    assert was_interrupted(KeyboardInterrupt())
    assert not was_interrupted(UnboundLocalError("x"))
    monkeypatch.setattr(INTERRUPTED, "value", True)
    assert was_interrupted(UnboundLocalError("x"))
    assert not was_interrupted(SystemExit(0))


def test_an_interrupt_python_swallowed_still_stops_the_search_in_the_trial(
        image_folder, tmp_path, monkeypatch):
    # a SIGINT landing in a GC callback never raises; the handler's flag is all that is left,
    # and the training in flight stops at its next step, as on a Ctrl-C that raised
    monkeypatch.setattr(INTERRUPTED, "value", False)
    calls = []

    def proxy_then_interrupt(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            INTERRUPTED.set()
        return proxy_train(*a, **kw)

    monkeypatch.setattr("nas.search.objective.proxy_train", proxy_then_interrupt)
    assert main(args(tmp_path, image_folder, "--trials", "10")) == 130
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert trials[1].user_attrs["end"] == "interrupted"
    assert (pd.read_csv(tmp_path / "s" / "trials.csv").state == "COMPLETE").sum() == 1


def test_a_trial_the_storage_failed_is_not_counted_and_another_takes_its_place(
        image_folder, tmp_path, monkeypatch):
    # a PostgreSQL restart mid-trial (tests/test_postgres.py) failed the trial as the
    # candidate's own failure: it counted toward --trials and the search ran one short
    calls = []

    def proxy_then_storage_error(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit.\nmore")
        return proxy_train(*a, **kw)

    monkeypatch.setattr("nas.search.objective.proxy_train", proxy_then_storage_error)
    assert main(args(tmp_path, image_folder, "--trials", "3")) == 0
    trials = study_of(tmp_path).trials
    assert [counts_toward_trials(t) for t in trials] == [True, False, True, True]
    assert trials[1].state == optuna.trial.TrialState.FAIL
    assert trials[1].user_attrs["end"] == "storage"
    assert trials[1].user_attrs["fail_reason"] == (
        "the study's storage failed: An exception is raised during the commit.")


def _ctrl_c_in_the_second_call(monkeypatch, owner, name: str) -> None:
    """Ctrl-C in the second call of owner.name, as the SIGINT handler does it: the flag set,
    then KeyboardInterrupt; once only."""
    monkeypatch.setattr(INTERRUPTED, "value", False)
    real, calls = getattr(owner, name), []

    def interrupted_second(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            INTERRUPTED.set()
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(owner, name, interrupted_second)


def _ctrl_c_in_the_second_training(monkeypatch) -> None:
    _ctrl_c_in_the_second_call(monkeypatch, nas.search.objective, "proxy_train")


def test_a_trial_stopped_by_ctrl_c_says_so(image_folder, tmp_path, monkeypatch):
    _ctrl_c_in_the_second_training(monkeypatch)
    assert main(args(tmp_path, image_folder, "--trials", "10")) == 130
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"
    assert pd.read_csv(tmp_path / "s" / "trials.csv").fail_reason[1] == "interrupted (Ctrl-C)"


def test_a_trial_cut_short_does_not_use_up_the_trials(image_folder, tmp_path, monkeypatch,
                                                        capsys):
    # it counted: '--trials 5', Ctrl-C in trial 1, then '--trials 2' evaluated nothing more
    _ctrl_c_in_the_second_training(monkeypatch)
    assert main(args(tmp_path, image_folder, "--trials", "5")) == 130
    monkeypatch.setattr(INTERRUPTED, "value", False)
    capsys.readouterr()
    assert main(args(tmp_path, image_folder, "--trials", "2")) == 0
    assert ": 1 finished trials, target 2;" in capsys.readouterr().out
    assert [t.state for t in study_of(tmp_path).trials] == [
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL,
        optuna.trial.TrialState.COMPLETE]


def test_an_interrupt_between_optunas_creating_a_trial_and_the_objective_fails_that_trial(
        image_folder, tmp_path, monkeypatch):
    # CI, 1 run in many: Ctrl-C landed after Optuna's ask had created a trial but before the
    # objective stamped it with its worker, so no process knew it as its own; it stayed RUNNING
    _ctrl_c_in_the_second_call(monkeypatch, optuna.study._optimize, "get_heartbeat_thread")
    assert main(args(tmp_path, image_folder, "--trials", "10")) == 130
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"


def _worker_attr(pid: int, host: str | None = None) -> str:
    return f"{host or socket.gethostname()}:{pid}"


@pytest.fixture
def live_pids():
    """Three live processes other than this one and its parent, and a dead one."""
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
             for _ in range(3)]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    yield [p.pid for p in procs], gone.pid
    for p in procs:
        p.kill()
        p.wait()


def test_local_trainers_counts_live_processes_on_this_host_training_the_study(live_pids):
    (a, b, c), dead = live_pids
    study = optuna.create_study()
    for pid, host in [(os.getpid(), None), (a, None), (a, None), (dead, None), (b, "elsewhere")]:
        study.ask().set_user_attr("worker", _worker_attr(pid, host))
    finished = study.ask()
    finished.set_user_attr("worker", _worker_attr(c))
    study.tell(finished, 1.0)
    assert local_trainers(study) == 2  # this one and a; dead, remote, finished: not
    for pid, on in [(b, True), (c, False), (dead, True)]:  # training baselines, or done
        study._storage.set_study_system_attr(study._study_id,
                                             f"{BASELINES_ATTR}{_worker_attr(pid)}", on)
    study._storage.set_study_system_attr(study._study_id,
                                         f"{BASELINES_ATTR}elsewhere:{c}", True)
    assert local_trainers(study) == 3  # and b, while it trains its baselines
    assert local_trainers(optuna.create_study()) == 1  # itself, between trials
    lower_dead_baselines_flags(study)  # as a new run does: a killed process's flag goes down
    flags = study._storage.get_study_system_attrs(study._study_id)
    assert [k for k, on in flags.items() if on] == [f"{BASELINES_ATTR}{_worker_attr(b)}",
                                                    f"{BASELINES_ATTR}elsewhere:{c}"]
    assert local_trainers(study) == 3


def test_thread_share_divides_the_cpus_among_local_trainers_unless_fixed(monkeypatch):
    monkeypatch.setattr("nas.search.cpu_share.available_cpus", lambda: 8)
    trainers = iter([1, 2, 3, 16])
    monkeypatch.setattr("nas.search.cpu_share.local_trainers", lambda study: next(trainers))
    auto = ThreadShare(8, "study", every_s=0)
    assert [auto() for _ in range(4)] == [8, 4, 2, 1]  # asked anew each time, at least 1
    trainers = iter([1, 4])
    two = ThreadShare(4, "study", every_s=0)
    assert [two(), two()] == [4, 2]  # never above --workers' share
    config = SearchConfig(target_ms=1, train_threads=3, workers=1)
    assert training_threads(config, "study")() == 3  # --train-threads is what the user asked for
    config = dataclasses.replace(config, train_threads=None)
    assert training_threads(config, None)() == 8  # no study (nothing to share): all
    assert isinstance(training_threads(config, "study"), ThreadShare)
    config = dataclasses.replace(config, local_workers=2)  # a --workers 2 child: its parent's
    assert train_threads(config) == 4 and training_threads(config, "study").most == 4  # share


def test_thread_share_reads_the_study_at_most_every_few_seconds_and_survives_a_failed_read(
        monkeypatch):
    monkeypatch.setattr(INTERRUPTED, "value", False)
    monkeypatch.setattr("nas.search.cpu_share.available_cpus", lambda: 4)
    reads, locked = [], sqlalchemy.exc.OperationalError("SELECT", {}, Exception("locked"))

    def trainers(study):
        answer = [1, 2, locked, 3][len(reads) % 4]
        reads.append(answer)
        if answer is locked:
            raise locked
        return answer

    monkeypatch.setattr("nas.search.cpu_share.local_trainers", trainers)
    throttled = ThreadShare(4, "study", every_s=3600)
    assert [throttled() for _ in range(5)] == [4] * 5 and len(reads) == 1
    share = ThreadShare(4, "study", every_s=0)
    assert [share(), share(), share()] == [2, 2, 1]  # a failed read keeps the last share
    INTERRUPTED.set()  # the interrupt, surfacing as a database error: not swallowed
    reads[:] = [None] * 2
    with pytest.raises(sqlalchemy.exc.OperationalError):
        share()


def test_workers_children_share_the_cores_at_most_at_their_parents_share(monkeypatch):
    started = []

    class FakeProcess:
        def __init__(self, target, name, args):
            self.child = args[0]

        def start(self):
            started.append(self.child)

        def is_alive(self):
            return False

    fake = types.SimpleNamespace(Event=threading.Event, Process=FakeProcess)
    monkeypatch.setattr("nas.search.workers.multiprocessing.get_context", lambda method: fake)
    monkeypatch.setattr("nas.search.cpu_share.available_cpus", lambda: 8)
    Workers.start(SearchConfig(target_ms=1, workers=4, train_threads=None, baselines=("x",)))
    assert len(started) == 3
    for child in started:  # not a fixed count: a ThreadShare, capped at 8 / 4
        assert (child.workers, child.train_threads, child.baselines) == (1, None, ())
        assert child.worker_index in (1, 2, 3) and child.local_workers == 4
        assert train_threads(child) == 2 and isinstance(training_threads(child, "s"), ThreadShare)


def test_baselines_train_on_a_share_and_are_counted_while_they_train(tmp_path, monkeypatch):
    monkeypatch.setattr("nas.search.cpu_share.available_cpus", lambda: 2)
    study, seen = optuna.create_study(), []
    ctx = Context(SearchConfig(target_ms=1, train_threads=None, workers=2), *[None] * 4)
    other = study.ask()
    other.set_user_attr("worker", _worker_attr(os.getppid()))  # another command's trial

    def fake_evaluate(arch, ctx, record, threads):
        flags = study._storage.get_study_system_attrs(study._study_id)
        seen.append((threads(), flags[f"{BASELINES_ATTR}{_worker_attr(os.getpid())}"]))
        record.update(latency_ms=2.0, accuracy=0.5, reward=0.5, arch_dict=arch.to_dict())
        return record

    monkeypatch.setattr("nas.search.baselines.evaluate_architecture", fake_evaluate)
    run_baselines(["mobilenet_v2"], ctx, tmp_path, study)
    assert seen == [(1, True)]  # its share beside the other command's trial; flag up
    other.set_user_attr("worker", "elsewhere:1")
    (tmp_path / "baselines.csv").unlink()
    run_baselines(["mobilenet_v2"], ctx, tmp_path, study)
    assert seen[-1] == (2, True)  # alone: every core, though --workers 2 (they start later)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    assert attrs == {f"{BASELINES_ATTR}{_worker_attr(os.getpid())}": False}  # down once done


def test_a_trial_trains_on_its_share_of_the_cpus_and_records_it(image_folder, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setattr("nas.search.cpu_share.available_cpus", lambda: 2)
    monkeypatch.setattr("nas.search.cpu_share.local_trainers", lambda study: 2)  # another command
    assert main(args(tmp_path, image_folder, "--trials", "1", "--proxy-epochs", "2")) == 0
    assert study_of(tmp_path).trials[0].user_attrs["train_threads"] == [1]
    assert pd.read_csv(tmp_path / "s" / "trials.csv").train_threads[0] == "[1]"



def test_every_database_url_gets_the_stamped_storage_with_its_heartbeat(tmp_path, monkeypatch):
    # mariadb, mssql or oracle went to Optuna's plain RDBStorage: no heartbeat, no stamp
    made = []

    class Recorder:
        def __init__(self, url, **kw):
            made.append((url, kw))

    monkeypatch.setattr("nas.search.study.StampedStorage", Recorder)
    for url in ("sqlite:///x.db", "postgresql://h/db", "mariadb+pymysql://u@h/db",
                "mssql+pyodbc://u@dsn"):
        assert isinstance(storage_for(SearchConfig(target_ms=1, storage=url), tmp_path), Recorder)
        assert made[-1][0] == url and made[-1][1]["heartbeat_interval"] > 0
        assert ("connect_args" in (made[-1][1]["engine_kwargs"] or {})) == (url[:6] == "sqlite")
    with pytest.raises(ValueError, match="Redis"):
        storage_for(SearchConfig(target_ms=1, storage="redis://h"), tmp_path)

def test_which_trials_count_toward_trials():
    fail = optuna.trial.TrialState.FAIL

    def trial(state, reason=None):
        attrs = {"fail_reason": reason} if reason else {}
        return optuna.trial.create_trial(state=state, user_attrs=attrs, value=(
            0.5 if state == optuna.trial.TrialState.COMPLETE else None))

    assert counts_toward_trials(trial(optuna.trial.TrialState.COMPLETE))
    assert counts_toward_trials(trial(optuna.trial.TrialState.PRUNED))
    assert counts_toward_trials(trial(fail, "non-finite training loss (nan) in epoch 1"))
    assert counts_toward_trials(trial(fail, "out of memory (2.0 GiB)"))
    assert not counts_toward_trials(trial(fail, "interrupted (Ctrl-C)"))
    assert not counts_toward_trials(trial(fail, "interrupted (SIGTERM)"))
    assert not counts_toward_trials(trial(fail, "worker host:123 died (killed?)"))
    assert not counts_toward_trials(trial(fail))  # failed by the storage heartbeat: no reason

    def ended(end, reason):  # since 2026-12-05 the end is stored, not read from the reason
        return optuna.trial.create_trial(state=fail, user_attrs={"fail_reason": reason,
                                                                 "end": end})

    assert counts_toward_trials(ended("failed", "ValueError: interrupted by a bad shape"))
    assert not counts_toward_trials(ended("interrupted", "stopped"))
    assert not counts_toward_trials(ended("died", "gone"))


def _deaf_worker(ready) -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


def test_interrupting_workers_kills_a_deaf_one_within_a_bounded_time(monkeypatch):
    # workers take SIGTERM as an interrupt now, so terminate() was no last resort any more: a
    # worker stuck (a 60 s SQLite busy wait) held the first process in an unbounded join
    fork = multiprocessing.get_context("fork")
    readies = [fork.Event() for _ in range(3)]
    workers = Workers(fork.Event(), [fork.Process(target=_deaf_worker, args=(r,))
                                     for r in readies])
    for proc, ready in zip(workers.procs, readies, strict=True):
        proc.start()
        assert ready.wait(30)
    monkeypatch.setattr(INTERRUPTED, "signum", signal.SIGTERM)
    start = time.monotonic()
    done = threading.Thread(target=workers.interrupt, kwargs={"grace_s": 0.3,
                                                              "kill_after_s": 0.5})
    done.start()
    done.join(20)
    try:
        assert not done.is_alive()
        assert time.monotonic() - start < 5  # one shared deadline, not 3 x (grace + wait)
        assert [p.exitcode for p in workers.procs] == [-signal.SIGKILL] * 3
    finally:
        for proc in workers.procs:
            if proc.is_alive():
                proc.kill()


def test_a_sigterm_while_workers_are_spawned_is_not_lost(image_folder, tmp_path, monkeypatch):
    # SIGINT and SIGTERM were ignored (SIG_IGN) while the workers were spawned: one arriving
    # then was dropped and the search ran on. Now they are held back, and it arrives after.
    monkeypatch.setattr(INTERRUPTED, "value", False)
    monkeypatch.setattr(INTERRUPTED, "signum", signal.SIGINT)
    real_start = multiprocessing.context.SpawnProcess.start

    def start_with_a_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        real_start(self)

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", start_with_a_sigterm)
    previous = signal.signal(signal.SIGTERM, on_sigint)
    try:
        status = main(args(tmp_path, image_folder, "--trials", "4", "--workers", "2"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 143
    assert not any(counts_toward_trials(t) for t in study_of(tmp_path).trials)


def _second_trial_interrupted_without_waiting_for_a_lock(tmp_path, image_folder) -> None:
    start = time.monotonic()
    assert main(args(tmp_path, image_folder, "--trials", "10")) == 130
    assert time.monotonic() - start < 50  # not the busy timeout
    trials = study_of(tmp_path).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE,
                                         optuna.trial.TrialState.FAIL]
    assert trials[1].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("where", ["training", "the trial's first write"])
def test_an_interrupt_in_the_middle_of_a_read_does_not_lock_the_study(
        image_folder, tmp_path, monkeypatch, capsys, error, where):
    # The bug behind 2-minute Ctrl-Cs with --workers 2 (about 1 run in 8; py-spy caught it in
    # both places): the interrupt landed while this process read the study, the open
    # statement's read lock lived on in the traceback, and the note "interrupted" or Optuna's
    # tell waited out the 60 s busy timeout. Also when the interrupt surfaces as another error.
    monkeypatch.setattr(INTERRUPTED, "value", False)
    calls = []

    def interrupt_mid_read():
        calls.append(1)
        if len(calls) == 2:
            reading = sqlite3.connect(tmp_path / "s" / "study.db")
            cursor = reading.execute("SELECT * FROM trials")  # a row read, the statement open
            assert cursor is not None
            INTERRUPTED.set()
            raise error("interrupted mid-read")

    if where == "training":
        def proxy(*a, **kw):
            interrupt_mid_read()
            return proxy_train(*a, **kw)

        monkeypatch.setattr("nas.search.objective.proxy_train", proxy)
    else:
        real = optuna.trial.Trial.set_user_attr

        def set_user_attr(self, key, value):
            if key == "worker":
                interrupt_mid_read()
            return real(self, key, value)

        monkeypatch.setattr(optuna.trial.Trial, "set_user_attr", set_user_attr)
    _second_trial_interrupted_without_waiting_for_a_lock(tmp_path, image_folder)
    assert "Traceback" not in capsys.readouterr().err


def test_an_interrupt_inside_optunas_tell_that_holds_the_write_lock_ends_cleanly(
        image_folder, tmp_path, monkeypatch):
    # optuna 5.0: a KeyboardInterrupt inside its tell's session came out as an UnboundLocalError
    # while that session, kept alive by the traceback, held SQLite's write lock; failing the
    # trial then waited out the 60 s busy timeout and raised "database is locked"
    monkeypatch.setattr(INTERRUPTED, "value", False)
    real = optuna.storages.RDBStorage.set_trial_state_values
    calls = []

    def interrupted_tell(self, trial_id, state, values=None):
        calls.append(trial_id)
        if len(calls) == 2:  # the second trial's tell
            held = sqlalchemy.orm.Session(self.engine)
            held.execute(sqlalchemy.text("UPDATE trials SET state = state"))  # write lock
            INTERRUPTED.set()
            raise UnboundLocalError("cannot access local variable 'trial'")
        return real(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", interrupted_tell)
    _second_trial_interrupted_without_waiting_for_a_lock(tmp_path, image_folder)
    assert (tmp_path / "s" / "trials.csv").exists()


@pytest.mark.parametrize("sig, status, reason", [
    (signal.SIGINT, 130, "interrupted (Ctrl-C)"),
    # kill, timeout, SLURM's time limit, docker stop: it used to die at once, writing no
    # results and leaving its trial RUNNING until the next run failed it as a dead worker's
    (signal.SIGTERM, 143, "interrupted (SIGTERM)")], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_cleanly_and_writes_results(image_folder, tmp_path, sig, status,
                                                           reason):
    # in training when the signal lands (as in test_killed_worker...: hard mode, T = 1 s, and
    # 8 epochs, so the trial in flight is neither pruned on latency nor over in a moment)
    proc = spawn(_long_trials(tmp_path, image_folder))
    try:
        assert _wait_for(lambda: _one_done_one_training(tmp_path))
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == status, out
    assert "Traceback" not in out and "interrupted: writing results" in out, out
    df = pd.read_csv(tmp_path / "s" / "trials.csv")
    assert (df.state == "COMPLETE").sum() >= 1
    assert (tmp_path / "s" / "best.yaml").exists()
    trials = study_of(tmp_path).trials
    assert not any(t.state == optuna.trial.TrialState.RUNNING for t in trials)
    assert trials[-1].state == optuna.trial.TrialState.FAIL
    assert trials[-1].user_attrs["fail_reason"] == reason


@pytest.mark.parametrize("flags, sampler", [([], "gp"), (["--sampler", "tpe"], "tpe"),
                                           (["--sampler", "nsga2"], "nsga2")])
def test_pareto_objective(image_folder, tmp_path, flags, sampler):
    # GP by default since sampler_efficiency_xeon.txt (the highest hypervolume at 100 trials)
    assert main(args(tmp_path, image_folder, "--trials", "3", "--objective", "pareto",
                     "--startup-trials", "1", *flags)) == 0  # GP and TPE propose twice
    study = study_of(tmp_path)
    assert len(study.directions) == 2
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert done and all(t.values == [t.user_attrs["accuracy"], t.user_attrs["latency_ms"]]
                        for t in done)
    assert json.loads((tmp_path / "s" / "run.json").read_text())["settings"]["sampler"] == sampler
    assert not math.isnan(pd.read_csv(tmp_path / "s" / "pareto.csv").accuracy.iloc[0])


@pytest.mark.parametrize("mode, best", [("hard", 0.5), ("hard", 0.05), ("soft", 0.5),
                                        ("soft", 0.3), ("soft", 1.2), ((-0.2, -1.0), 1.1)])
def test_above_the_latency_bound_no_accuracy_beats_the_best_and_below_it_one_does(mode, best):
    alpha, beta = MODES[mode] if isinstance(mode, str) else mode
    bound = latency_bound_ms(best, 10.0, alpha, beta)
    if mode == "soft" and best <= 1:
        assert bound > 10.0 * 1e4  # a slow but accurate candidate can still win: train it
    assert reward(1.0, bound, 10.0, alpha=alpha, beta=beta) == pytest.approx(best)
    assert reward(1.0, bound * 1.01, 10.0, alpha=alpha, beta=beta) < best
    assert reward(1.0, bound * 0.99, 10.0, alpha=alpha, beta=beta) > best


def test_no_latency_bound_without_a_reachable_best():
    assert latency_bound_ms(float("nan"), 10.0, -0.07, -0.07) is None
    assert latency_bound_ms(0.0, 10.0, 0.0, -1.0) is None
    assert latency_bound_ms(0.5, 10.0, 0.0, 0.0) is None  # no latency penalty at all
    assert latency_bound_ms(1.2, 10.0, 0.0, -1.0) is None  # alpha 0: nothing reaches 1.2


def test_candidates_that_cannot_beat_the_best_reward_are_not_trained(image_folder, tmp_path):
    # a finished trial with reward 0.9 in hard mode: at T = 0.001 ms every network is slower
    # than T / 0.9, where even accuracy 1 gives less
    (tmp_path / "s").mkdir()
    study = optuna.create_study(study_name="s", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 's' / 'study.db'}")
    study.add_trial(optuna.trial.create_trial(value=0.9))
    argv = args(tmp_path, image_folder, "--trials", "3", "--mode", "hard")
    argv[argv.index("--target-ms") + 1] = "0.001"
    assert main(argv) == 0
    trials = study_of(tmp_path).trials[1:]
    assert [t.state for t in trials] == [optuna.trial.TrialState.PRUNED] * 2
    for t in trials:
        assert "below the best so far (0.9000)" in t.user_attrs["fail_reason"]
        assert "accuracy" not in t.user_attrs and t.user_attrs["latency_stopped_early"]


def test_without_a_finished_trial_even_a_slow_candidate_is_trained(image_folder, tmp_path):
    argv = args(tmp_path, image_folder, "--trials", "1", "--mode", "hard")
    argv[argv.index("--target-ms") + 1] = "0.001"  # every network is far slower than this
    assert main(argv) == 0
    (trial,) = study_of(tmp_path).trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value < 0.01


def test_plot_regenerates_results_from_storage(finished_run):
    from nas.plot import main as plot_main
    (finished_run / "pareto.csv").unlink()
    (finished_run / "pareto.html").unlink()
    assert plot_main([str(finished_run)]) == 0
    assert (finished_run / "pareto.csv").exists() and (finished_run / "pareto.html").exists()


def test_failed_baseline_is_measured_again_on_resume_and_finished_ones_are_not(tmp_path,
                                                                               monkeypatch):
    calls = []

    def fake_evaluate(arch, ctx, record, threads=None):
        calls.append(arch.to_str())
        record.update(latency_ms=2.0, arch_dict=arch.to_dict())  # measured before training
        if len(calls) == 1:
            raise CandidateFailed("out of memory: boom")
        record.update(accuracy=0.5, reward=0.5)
        return record

    monkeypatch.setattr("nas.search.baselines.evaluate_architecture", fake_evaluate)
    names = ["mobilenet_v2", "mobilenet_v3_small"]
    first = run_baselines(names, None, tmp_path)
    assert list(first.state) == ["FAIL", "COMPLETE"]
    assert first.fail_reason[0] == "out of memory: boom"
    assert first.latency_ms[0] == 2.0  # its latency is kept (it was lost)
    second = run_baselines(names, None, tmp_path)
    assert calls == [load_architecture(n).to_str() for n in [*names, "mobilenet_v2"]]
    assert list(second.baseline) == names and list(second.state) == ["COMPLETE", "COMPLETE"]
    saved = pd.read_csv(tmp_path / "baselines.csv")
    assert list(saved.state) == ["COMPLETE", "COMPLETE"]


def test_an_interrupted_process_fails_its_own_running_trial_but_not_others():
    study = optuna.create_study()
    host = socket.gethostname()
    mine, alive_elsewhere = study.ask(), study.ask()
    mine.set_user_attr("worker", f"{host}:{os.getpid()}")
    alive_elsewhere.set_user_attr("worker", f"{host}:{os.getppid()}")  # a live process
    assert fail_dead_local_trials(study) == []  # without `ours`, this process counts as alive
    assert fail_dead_local_trials(study, ours=True) == [mine.number]
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING]
    assert study.trials[0].user_attrs["fail_reason"] == "interrupted (Ctrl-C)"


def test_every_flag_is_a_field_of_the_frozen_config_with_the_same_default():
    from nas.search.config import build_parser, config_from_argv, resolve

    dests = {a.dest: a.default for a in build_parser()._actions if a.dest != "help"}
    fields = {f.name: f.default for f in dataclasses.fields(SearchConfig)}
    assert set(fields) - set(dests) == {"worker_index", "local_workers"}  # not flags
    for dest, default in dests.items():
        if dest not in ("target_ms", "baselines"):
            assert fields[dest] == default, dest
    config = config_from_argv(["--target-ms", "5", "--baselines", " mobilenet_v2, ,mnasnet_a1"])
    assert config == SearchConfig(target_ms=5.0, baselines=("mobilenet_v2", "mnasnet_a1"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.trials = 3
    resolved = resolve(config)
    assert (resolved.sampler, resolved.train_device) == ("gp", "cpu")
    assert resolve(resolved) == resolved
    pareto = resolve(dataclasses.replace(config, objective="pareto", device="cpu"))
    assert pareto.sampler == "gp" and pareto.exponents == (-0.07, -0.07)
    child = resolved.child(2)
    assert (child.workers, child.baselines, child.worker_index) == (1, (), 2)


def test_the_python_api_refuses_bad_input_with_the_flags_words(tmp_path):
    from nas.search import UsageError, run

    with pytest.raises(UsageError, match="--proxy-batch 64: must be <= --proxy-images 32"):
        run(SearchConfig(target_ms=1, proxy_images=32, proxy_batch=64, runs_dir=str(tmp_path)))
    assert list(tmp_path.iterdir()) == []


def test_a_baseline_in_the_space_is_the_first_trial_once(image_folder, tmp_path):
    from nas.arch import save_architecture
    from nas.space import load_space

    space = load_space("tiny")
    member = space.sample(optuna.trial.FixedTrial(
        {"b0_op": "sepconv", "b0_repeats_delta": 1, "b1_op": "mbconv", "b1_kernel": 5,
         "b1_expansion": 4, "b1_se_ratio": 0.25, "b1_filters": 16, "b2_expansion": 6,
         "b2_repeats_delta": 0, "b2_filters": 24, "b2_skip": "none"}))
    path = str(save_architecture(member, tmp_path / "member.yaml"))
    flags = ["--sampler", "random", "--baselines", f"{path},mobilenet_v3_small"]
    assert main(args(tmp_path, image_folder, "--trials", "2", *flags)) == 0
    trials = study_of(tmp_path).trials
    assert trials[0].params == space.params_of(member)
    assert trials[0].user_attrs["enqueued_baseline"] == path
    assert trials[0].user_attrs["arch"] == member.to_str()
    assert all(t.user_attrs.get("enqueued_baseline") is None for t in trials[1:])
    assert main(args(tmp_path, image_folder, "--trials", "3", *flags)) == 0  # resumed
    assert sum("enqueued_baseline" in t.user_attrs for t in study_of(tmp_path).trials) == 1
    assert main(args(tmp_path, image_folder, "--trials", "1", "--name", "off",
                     "--no-enqueue-baselines", *flags)) == 0
    assert "enqueued_baseline" not in study_of(tmp_path, "off").trials[0].user_attrs


def test_an_input_size_the_reference_cannot_be_timed_at_is_one_line_and_leaves_no_study(
        image_folder, tmp_path, capsys, monkeypatch):
    # --input-size 99999 ran out of memory calibrating the reference: a traceback, and the
    # new study stayed with input_size=99999, refusing the corrected command
    import nas.search.runner

    def out_of_memory(*a, **kw):  # torch's CPU allocator, as it reports it
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 119997600012 bytes.")

    monkeypatch.setattr(nas.search.runner, "calibrated_reference_ms", out_of_memory)
    argv = args(tmp_path / "runs", image_folder, "--trials", "1")
    del argv[argv.index("--latency-protocol"):argv.index("--latency-protocol") + 2]
    assert main(argv) == 2
    one_line_error(capsys, "nas.search", "--input-size 32: out of memory timing the reference "
                                         "network mnasnet_a1 (a 111.8 GiB tensor")
    assert not (tmp_path / "runs").exists()  # made by the call, so gone with it
    monkeypatch.undo()
    assert main(argv) == 0  # the same name starts afresh
    assert study_of(tmp_path / "runs").user_attrs["reference_ms"] > 0
    # another error is not turned into that line
    monkeypatch.setattr(nas.search.runner, "calibrated_reference_ms", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main([*argv[:-2], "--name", "other"])


def test_the_default_interleaved_protocol_calibrates_the_reference_once_per_study(
        image_folder, tmp_path, capsys, monkeypatch):
    import nas.search.runner

    def interleaved(*extra):
        argv = args(tmp_path, image_folder, *extra)
        del argv[argv.index("--latency-protocol"):argv.index("--latency-protocol") + 2]
        return argv  # the default protocol

    assert main(interleaved("--trials", "2")) == 0
    study = study_of(tmp_path)
    assert study.user_attrs["settings"]["latency_protocol"] == protocol_name()
    reference = study.user_attrs["reference_ms"]
    assert reference > 0
    for t in study.trials:
        ua = t.user_attrs
        assert ua["latency_raw_ms"] > 0 and ua["latency_ms"] > 0
        assert 0 <= ua["gate_wait_s"] <= ua["train_s"]  # what the core gate held it back
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert {e["result"]["protocol"] for e in cache["entries"]} == {protocol_name()}
    assert {e["result"]["reference_ms"] for e in cache["entries"]} == {reference}

    def no_second_calibration(*a, **kw):
        raise AssertionError("the study's reference latency is reused")

    monkeypatch.setattr(nas.search.runner, "calibrated_reference_ms", no_second_calibration)
    assert main(interleaved("--trials", "3")) == 0
    assert study_of(tmp_path).user_attrs["reference_ms"] == reference
    # another protocol is another study: refused with the flag that resumes it
    capsys.readouterr()
    assert main(args(tmp_path, image_folder, "--trials", "4")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nas.search: error: study 's' measured latency with latency_protocol "
                   f"'{protocol_name()}', not 'single'; resume with --latency-protocol "
                   "interleaved or pick a new --name"]
    # other warm runs per block are another yardstick: refused with the flag that resumes it
    other = 0 if WARM_RUNS_PER_BLOCK else 2
    assert main(interleaved("--trials", "4", "--latency-warm-runs", str(other))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["nas.search: error: study 's' measured latency with latency_protocol "
                   f"'{protocol_name()}', not '{protocol_name(warm_runs=other)}'; resume with "
                   f"--latency-warm-runs {WARM_RUNS_PER_BLOCK} or pick a new --name"]


def test_a_study_from_before_warm_runs_resumes_with_0_and_measures_as_it_did(
        image_folder, tmp_path, capsys):
    """A study of the interleaved protocol without warm runs (interleaved:mnasnet_a1, before
    2026-12-07) is refused by the new default in one line naming --latency-warm-runs 0; with
    it, it resumes and its new trials are measured as the old ones were."""
    def interleaved(*extra):
        argv = args(tmp_path, image_folder, *extra)
        del argv[argv.index("--latency-protocol"):argv.index("--latency-protocol") + 2]
        return argv

    assert main(interleaved("--trials", "1", "--latency-warm-runs", "0")) == 0
    assert study_of(tmp_path).user_attrs["settings"]["latency_protocol"] == (
        "interleaved:mnasnet_a1")
    capsys.readouterr()
    if WARM_RUNS_PER_BLOCK:
        assert main(interleaved("--trials", "2")) == 2
        assert "resume with --latency-warm-runs 0 or pick" in capsys.readouterr().err
    assert main(interleaved("--trials", "2", "--latency-warm-runs", "0")) == 0
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert {e["result"]["protocol"] for e in cache["entries"]} == {"interleaved:mnasnet_a1"}


def test_the_ladder_protocol_keeps_every_rungs_calibration_in_the_study(
        image_folder, tmp_path, capsys, monkeypatch):
    """--latency-protocol ladder: each candidate timed against the nearest rung of
    mnasnet_a1's widths; the study keeps {rung: ms} and a resume reuses it; a server is refused
    for now, in one line."""
    import nas.search.runner
    from nas.interleaved import ladder_rungs

    def ladder(*extra):
        argv = args(tmp_path, image_folder, *extra)
        argv[argv.index("--latency-protocol") + 1] = "ladder"
        return argv

    assert main(ladder("--trials", "2", "--sampler", "random")) == 0
    study = study_of(tmp_path)
    assert study.user_attrs["settings"]["latency_protocol"] == protocol_name(ladder=True)
    rungs = study.user_attrs["reference_ms"]
    assert sorted(rungs) == sorted(ladder_rungs()) and all(v > 0 for v in rungs.values())
    cache = json.loads((tmp_path / "s" / "latency_cache.json").read_text())
    assert cache["entries"] and all(e["result"]["reference_ms"] in rungs.values()
                                    for e in cache["entries"])
    monkeypatch.setattr(nas.search.runner, "calibrated_ladder_ms",
                        lambda *a, **kw: pytest.fail("the study's rungs are reused"))
    assert main(ladder("--trials", "3", "--sampler", "random")) == 0
    assert study_of(tmp_path).user_attrs["reference_ms"] == rungs
    capsys.readouterr()
    assert main(args(tmp_path, image_folder, "--trials", "4")) == 2
    assert "resume with --latency-protocol ladder" in capsys.readouterr().err
    token = tmp_path / "token"
    token.write_text("x" * 32)
    assert main(ladder("--name", "remote", "--latency-server", "http://127.0.0.1:9",
                       "--latency-token-file", str(token))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--latency-protocol ladder: measured here only" in err[0]


def test_the_front_and_the_baselines_are_re_measured_together_at_the_end(finished_run):
    final = pd.read_csv(finished_run / "front_latency.csv")
    front = pd.read_csv(finished_run / "pareto.csv")
    assert sorted(final.number.dropna().astype(int)) == sorted(front.number)
    assert list(final.baseline.dropna()) == ["mobilenet_v3_small"]
    assert (final.latency_final_p10_ms <= final.latency_final_ms).all()
    merged = front.merge(final, on="number", suffixes=("", "_file"))
    assert list(merged.latency_final_ms) == list(merged.latency_final_ms_file)
    assert "re-measured with the front" in (finished_run / "pareto.html").read_text()


def test_nas_plot_re_measures_the_front_and_the_baselines_together(finished_run, tmp_path,
                                                                   capsys):
    from nas import plot
    run = shutil.copytree(finished_run, tmp_path / "s")
    (run / "front_latency.csv").unlink()
    (run / "pareto.csv").unlink()
    assert plot.main([str(run), "--remeasure", "--latency-time", "0.1"]) == 0
    final = pd.read_csv(run / "front_latency.csv")
    front = pd.read_csv(run / "pareto.csv")
    assert sorted(final.number.dropna().astype(int)) == sorted(front.number)
    assert list(final.baseline.dropna()) == ["mobilenet_v3_small"]
    assert front.latency_final_ms.notna().all() and (final.latency_final_ms > 0).all()
    # measured on another device: refused in one line, nothing rewritten
    meta = json.loads((run / "run.json").read_text())
    meta["settings"]["latency_device"] = "Another CPU (family 1 model 2, avx2)"
    (run / "run.json").write_text(json.dumps(meta))
    before = (run / "front_latency.csv").read_text()
    capsys.readouterr()
    assert plot.main([str(run), "--remeasure", "--latency-time", "0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run nas.plot --remeasure there" in err[0]
    assert (run / "front_latency.csv").read_text() == before


def test_an_interrupt_while_re_measuring_the_front_still_writes_the_results(
        image_folder, tmp_path, monkeypatch):
    def interrupted(*a, **kw):
        INTERRUPTED.set()
        raise KeyboardInterrupt

    monkeypatch.setattr("nas.search.runner.remeasure_front", interrupted)
    assert main(args(tmp_path, image_folder, "--trials", "1")) == 130
    assert len(pd.read_csv(tmp_path / "s" / "trials.csv")) == 1
    assert not (tmp_path / "s" / "front_latency.csv").exists()


def test_a_background_thread_the_database_failed_under_is_one_line(capsys):
    from nas.search.study import quiet_storage_threads

    seen = []
    hook = quiet_storage_threads(seen.append)
    failure = optuna.exceptions.StorageInternalError("commit failed")
    failure.__cause__ = sqlalchemy.exc.OperationalError(
        "INSERT", {}, Exception("terminating connection due to administrator command"))
    hook(types.SimpleNamespace(exc_type=type(failure), exc_value=failure, thread=None))
    err = capsys.readouterr().err.strip().splitlines()
    assert seen == [] and len(err) == 1 and "administrator command" in err[0]
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("a bug"), thread=None)
    hook(other)
    assert seen == [other]  # anything else still gets the usual traceback
