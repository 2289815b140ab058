"""Export rebuilds exactly the searched network; full training checkpoints, resumes and exports."""

import errno
import io
import json
import shutil
import sys
from dataclasses import replace

import pandas as pd
import pytest
import torch
from conftest import one_line_error, sigterm_once

from nas import confirm, export, plot, search, train
from nas.arch import BlockSpec, load_architecture
from nas.cost import count_params
from nas.model import build_model
from nas.proxy import ProxyBudget, proxy_arch


@pytest.fixture(scope="module")
def run(image_folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    argv = ["--space", "tiny", "--val-size", "30", "--proxy-images", "64", "--proxy-epochs", "1",
            "--proxy-batch", "32", "--input-size", "32", "--latency-time", "0.1",
            "--target-ms", "1", "--trials", "3", "--sampler", "random", "--data",
            str(image_folder), "--runs-dir", str(runs), "--name", "x", "--runtime", "eager"]
    assert search.main(argv) == 0
    return runs / "x"


def test_export_best_pareto_and_trial(run, tmp_path):
    trials = pd.read_csv(run / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    assert export.main([str(run), "-o", str(tmp_path / "best.yaml")]) == 0
    best = done.loc[done.reward.idxmax()]
    arch = load_architecture(tmp_path / "best.yaml")
    assert arch.to_str() == best.arch
    assert count_params(build_model(arch, num_classes=3)) == best.params
    front = pd.read_csv(run / "pareto.csv").sort_values("latency_ms")
    assert export.main([str(run), "--pareto", "0", "-o", str(tmp_path / "fast.json")]) == 0
    assert load_architecture(tmp_path / "fast.json").to_str() == front.arch.iloc[0]
    n = int(done.number.iloc[-1])
    assert export.main([str(run), "--trial", str(n), "-o", str(tmp_path / "t.yaml")]) == 0
    assert load_architecture(tmp_path / "t.yaml").to_str() == done.arch.iloc[-1]
    assert load_architecture(tmp_path / "t.yaml").name == f"x-trial-{n}"  # <run>-trial-<n>


def test_export_of_the_best_trial_alone_adds_the_search_s_drift_note(run, tmp_path, capsys,
                                                                   monkeypatch):
    seen = []
    monkeypatch.setattr(export, "target_drift_note",
                        lambda df, t, beta: seen.append((t, beta)) or "note: above T.")
    assert export.main([str(run), "-o", str(tmp_path / "best.yaml")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("trial ") and out[1].startswith("note: above T. Or export")
    assert seen == [(1.0, -0.07)]  # the run's T and soft beta
    for pick in (["--trial", "0"], ["--pareto", "0"]):  # a trial the user chose: no note
        assert export.main([str(run), *pick, "-o", str(tmp_path / "p.yaml")]) == 0
        assert "note:" not in capsys.readouterr().out



def test_export_of_the_best_trial_names_the_baselines_that_scored_above_it(run, tmp_path,
                                                                          capsys):
    import shutil

    copy = shutil.copytree(run, tmp_path / "x")
    best = pd.read_csv(copy / "trials.csv").reward.max()
    (copy / "baselines.csv").write_text(
        "baseline,state,reward,latency_ms,accuracy\n"
        f"mobilenet_v3_small,COMPLETE,{best + 0.1},0.5,0.9\n"
        f"mobilenet_v2,COMPLETE,{best - 0.1},0.9,0.5\n"
        "mnasnet_a1,FAIL,,,\n")
    assert export.main([str(copy), "-o", str(tmp_path / "best.yaml")]) == 0
    out = capsys.readouterr().out
    assert (f"note: in the search the baseline mobilenet_v3_small ({best + 0.1:.4f}) scored "
            f"above this trial's reward {best:.4f}") in out
    assert "mobilenet_v2" not in out and "mnasnet_a1" not in out
    assert export.main([str(copy), "--trial", "0", "-o", str(tmp_path / "t.yaml")]) == 0
    assert "note: in the search" not in capsys.readouterr().out  # a trial the user chose
    (copy / "baselines.csv").write_text("not,a\ntable")  # damaged: the export goes on
    assert export.main([str(copy), "-o", str(tmp_path / "best.yaml")]) == 0

@pytest.fixture(scope="module")
def trained(run, image_folder, tmp_path_factory):
    """A 1-epoch nas.train checkpoint of the run's best architecture, and its PyTorch network."""
    runs = tmp_path_factory.mktemp("trained")
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(runs), "--name", "t", "--batch-size", "32", "--no-progress",
                       "--epochs", "1"]) == 0
    ckpt = runs / "t" / "checkpoint.pt"
    arch = load_architecture(run / "best.yaml")
    model = build_model(proxy_arch(arch, ProxyBudget(final_map=train.TrainConfig().final_map),
                                   32), num_classes=3).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    return ckpt, model


@pytest.mark.parametrize("suffix", [".onnx", ".pte", ".pt2"])
def test_export_writes_the_network_for_its_runtime_with_the_trained_weights(
        run, trained, tmp_path, capsys, suffix):
    from nas.runtimes import RUNTIMES

    runtime = RUNTIMES[export.SUFFIX_RUNTIMES[suffix]]
    if not runtime.available():
        pytest.skip(f"{runtime.name} is not installed here")
    ckpt, model = trained
    net = tmp_path / f"net{suffix}"
    assert export.main([str(run), "-o", str(tmp_path / "a.yaml"), "--checkpoint", str(ckpt),
                        "--network", str(net)]) == 0
    out = capsys.readouterr().out
    assert f"{net} ({runtime.name} fp32, input 32x32; max abs difference to PyTorch" in out
    predict = runtime.load(net.read_bytes(), threads=1, device="cpu")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(predict(x), model(x), rtol=1e-4, atol=1e-4)


def test_an_int8_export_is_calibrated_on_the_data_and_quantized(run, trained, image_folder,
                                                                tmp_path, capsys):
    onnx = pytest.importorskip("onnx")
    ckpt, _ = trained
    net = tmp_path / "q.onnx"
    argv = [str(run), "-o", str(tmp_path / "q.yaml"), "--checkpoint", str(ckpt),
            "--network", str(net), "--precision", "int8"]
    assert export.main(argv) == 2
    assert "pass --data" in one_line_error(capsys, "nas.export", "--precision int8")
    assert not any(tmp_path.iterdir())
    assert export.main([*argv, "--data", str(image_folder)]) == 0
    assert "(onnxruntime int8, input 32x32" in capsys.readouterr().out
    ops = {n.op_type for n in onnx.load(str(net)).graph.node}
    assert "QuantizeLinear" in ops


@pytest.mark.parametrize("runtime", ["onnxruntime", "executorch"])
def test_train_scores_the_int8_network_its_runtime_would_deploy(run, image_folder, tmp_path,
                                                                capsys, runtime):
    from nas.runtimes import RUNTIMES

    if not RUNTIMES[runtime].available():
        pytest.skip(f"{runtime} is not installed here")
    argv = [str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir", str(tmp_path),
            "--name", "q", "--batch-size", "32", "--no-progress", "--epochs", "2",
            "--int8", runtime]
    assert train.main(argv) == 0
    metrics = json.loads((tmp_path / "q" / "metrics.json").read_text())
    q = metrics["int8"]
    assert q["runtime"] == runtime and q["precision"] == "int8"
    assert q["calibration_images"] == 100  # one whole batch of the tiny set's 120 images
    # 30 test images: accuracy in steps of 1/30, and int8 keeps most of float32's
    assert q["test_accuracy"] * 30 == pytest.approx(round(q["test_accuracy"] * 30))
    assert abs(q["test_accuracy"] - metrics["test_accuracy"]) <= 0.2
    assert f"int8 test accuracy {q['test_accuracy']:.4f} ({runtime}" in capsys.readouterr().out


def test_train_refuses_an_int8_runtime_that_is_not_installed_before_training(
        run, image_folder, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "executorch" else real(name, *a))
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(tmp_path), "--epochs", "1", "--int8", "executorch"]) == 2
    assert "not installed" in one_line_error(capsys, "nas.train", "--int8 executorch")
    assert not any(tmp_path.iterdir())  # refused before any training or folder


def test_a_network_suffix_without_a_runtime_is_one_line(run, tmp_path, capsys):
    assert export.main([str(run), "-o", str(tmp_path / "a.yaml"), "--network",
                        str(tmp_path / "a.tflite")]) == 2
    assert ".onnx (onnxruntime), .pte (executorch), .pt2 (aoti)" in one_line_error(
        capsys, "nas.export", "--network")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("extra, fragment", [(["--trial", "999"], "--trial 999"),
                                             (["--pareto", "99"], "--pareto 99")])
def test_export_bad_selection_is_one_line_and_writes_nothing(run, tmp_path, capsys, extra,
                                                             fragment):
    out = tmp_path / "a.yaml"
    assert export.main([str(run), *extra, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not out.exists()


def test_export_not_a_run_folder(tmp_path, capsys):
    assert export.main([str(tmp_path), "-o", str(tmp_path / "a.yaml")]) == 2
    assert "not a run folder" in capsys.readouterr().err


TRAINABLE_TINY = ("sep_k3_s1_r1_c8", "mb2_k3_s2_r1_c8", "mb3_k3_s2_r1_c24_relu6")


def test_interrupted_training_resumes_exactly_where_it_stopped(
        run, image_folder, tmp_path, monkeypatch, capsys):
    # a fixed network of the tiny space (not the run's best, which depends on what the sampler
    # drew), with dropout, to draw from the global RNG
    best = load_architecture(run / "best.yaml")
    blocks = tuple(BlockSpec.from_str(b) for b in TRAINABLE_TINY)
    arch_file = tmp_path / "best-dropout.yaml"
    arch_file.write_text(replace(best, blocks=blocks,
                                 head=replace(best.head, dropout=0.5)).to_yaml())
    common = [str(arch_file), "--data", str(image_folder), "--runs-dir", str(tmp_path),
              "--batch-size", "32", "--no-progress", "--epochs", "3"]
    assert train.main([*common, "--name", "whole"]) == 0
    real_save = train._save

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "_save", save_then_interrupt)
    assert train.main([*common, "--name", "t"]) == 130
    assert "the same command resumes" in capsys.readouterr().err
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    assert train.main([*common, "--name", "t"]) == 0  # resumes after epoch 1
    assert "resuming" in capsys.readouterr().out
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)
    resumed = torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)
    for key, value in whole["model"].items():  # model, optimiser, schedule and dropout restored
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    expected = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert [h["loss"] for h in metrics["history"]] == [h["loss"] for h in expected["history"]]
    assert metrics["test_accuracy"] == metrics["history"][-1]["test_accuracy"]
    assert metrics["test_accuracy"] > 0.5  # colour classes are easy; chance is 1/3


def test_sigterm_stops_training_as_ctrl_c_does(run, image_folder, tmp_path):
    # kill, timeout, a batch scheduler's time limit: it used to die without a word; now it
    # says the last finished epoch is kept, and exits with the shell's 143
    arch_file = tmp_path / "a.yaml"
    arch_file.write_text(replace(load_architecture(run / "best.yaml"), blocks=tuple(
        BlockSpec.from_str(b) for b in TRAINABLE_TINY)).to_yaml())
    ckpt = tmp_path / "t" / "checkpoint.pt"
    status, out, err = sigterm_once(
        [sys.executable, "-m", "nas.train", str(arch_file), "--data", str(image_folder),
         "--runs-dir", str(tmp_path), "--name", "t", "--batch-size", "32", "--no-progress",
         "--epochs", "500"], ready=ckpt.exists, wait_s=120)
    assert status == 143, (out, err)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"nas.train: interrupted (SIGTERM); {ckpt} holds the last finished epoch, and the same "
        "command resumes from it")
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1
    assert not (tmp_path / "t" / "metrics.json").exists()


def test_an_architecture_name_cannot_put_the_run_folder_outside_runs_dir(run, image_folder,
                                                                         tmp_path):
    # the default folder is train-<the file's name: field>; '../../escaped' climbed out
    arch_file = tmp_path / "a.yaml"
    arch_file.write_text(replace(load_architecture(run / "best.yaml"),
                                 name="../../escaped").to_yaml())
    runs = tmp_path / "deep" / "runs"
    assert train.main([str(arch_file), "--data", str(image_folder), "--runs-dir", str(runs),
                       "--batch-size", "32", "--no-progress", "--epochs", "1"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.yaml", "deep"]
    assert [p.name for p in runs.iterdir()] == ["train-..-..-escaped"]
    assert (runs / "train-..-..-escaped" / "metrics.json").exists()


def test_a_checkpoint_that_cannot_be_written_is_one_line(run, image_folder, tmp_path, capsys,
                                                         monkeypatch):
    # a read-only run folder (as another user than root) or a full disk: it was a traceback
    def refused(path, data):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(train, "write_atomic", refused)
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(tmp_path), "--name", "t", "--batch-size", "32", "--no-progress",
                       "--epochs", "1"]) == 2
    line = one_line_error(capsys, "nas.train", "checkpoint.pt")
    assert line.endswith("checkpoint.pt.tmp: Permission denied") or line.endswith(
        "checkpoint.pt: Permission denied"), line


def test_export_puts_the_trained_weights_into_torchscript_and_onnx(run, image_folder, tmp_path):
    arch_file = run / "best.yaml"
    assert train.main([str(arch_file), "--data", str(image_folder), "--runs-dir", str(tmp_path),
                       "--name", "t", "--batch-size", "32", "--no-progress", "--epochs", "1"]) == 0
    pt = tmp_path / "net.pt"
    onnx_file = tmp_path / "net.onnx"
    assert export.main([str(run), "-o", str(tmp_path / "a.yaml"), "--checkpoint",
                        str(tmp_path / "t" / "checkpoint.pt"), "--torchscript", str(pt),
                        "--onnx", str(onnx_file)]) == 0
    arch = load_architecture(arch_file)
    trained = proxy_arch(arch, ProxyBudget(final_map=train.TrainConfig().final_map), 32)
    model = build_model(trained, num_classes=3).eval()
    model.load_state_dict(torch.load(tmp_path / "t" / "checkpoint.pt",
                                     weights_only=True)["model"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(pt))(x), model(x))
    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load(str(onnx_file)))


def test_a_one_epoch_run_warms_up_then_anneals_to_zero():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = train._optimizer(model, train.TrainConfig(epochs=1, lr=1.0), 10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1.0 and lrs.count(1.0) == 1  # a tenth of the steps warms up, peak once
    assert lrs == sorted(lrs, reverse=True) and 0 < lrs[-1] < 0.03  # annealed, last step useful
    optimizer, scheduler = train._optimizer(model, train.TrainConfig(epochs=30, lr=1.0), 10)
    assert [scheduler.lr_lambdas[0](s) for s in (0, 9, 10)] == [pytest.approx(0.1), 1.0,
                                                               pytest.approx(1.0, abs=1e-3)]


def test_clip_grad_bounds_each_step_and_a_resume_keeps_it(run, image_folder, tmp_path, capsys):
    """--clip-grad NORM caps the gradient's norm before each step: at a tiny norm the weights
    keep their initial values but for weight decay; 0 trains unclipped, the default clips at 1;
    a resume with another norm is refused, naming how to train as before."""
    arch_file = tmp_path / "net.yaml"
    arch_file.write_text(replace(load_architecture(run / "best.yaml"), blocks=tuple(
        BlockSpec.from_str(b) for b in TRAINABLE_TINY)).to_yaml())
    common = [str(arch_file), "--data", str(image_folder), "--runs-dir", str(tmp_path),
              "--batch-size", "32", "--no-progress", "--epochs", "1"]
    cfg = train.TrainConfig(epochs=1)
    torch.manual_seed(cfg.seed)  # the initial weights, as train() draws them
    init = build_model(train.trained_arch(load_architecture(arch_file), cfg, 32),
                       num_classes=3).state_dict()

    def moved(name: str) -> float:
        """Largest relative change of a convolution's weights from their initial values."""
        model = torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]
        return max(float((model[k] - v).norm() / v.norm()) for k, v in init.items()
                   if k.endswith("weight") and v.ndim == 4)

    assert train.main([*common, "--name", "free", "--clip-grad", "0"]) == 0
    assert train.main([*common, "--name", "clipped", "--clip-grad", "1e-9"]) == 0
    free, clipped = moved("free"), moved("clipped")
    assert clipped < free / 10, (clipped, free)  # decay alone moves them: lr x 5e-4 per step
    assert train.main([*common, "--name", "clipped", "--clip-grad", "1", "--epochs", "1"]) == 2
    assert "clip_grad=1e-09, not 1.0" in capsys.readouterr().err
    assert train.TrainConfig().clip_grad == 1.0
    assert train.main([*common, "--name", "free"]) == 2  # the default clips: not this run's recipe
    err = capsys.readouterr().err
    assert "clip_grad=None, not 1.0" in err and "--clip-grad 0 trains unclipped" in err
    assert json.loads((tmp_path / "free" / "metrics.json").read_text())["config"][
        "clip_grad"] is None


def test_resume_with_other_epochs_or_other_data_is_refused(run, image_folder, tmp_path, capsys):
    common = [str(run / "best.yaml"), "--runs-dir", str(tmp_path), "--name", "t",
              "--batch-size", "32", "--no-progress"]
    assert train.main([*common, "--data", str(image_folder), "--epochs", "1"]) == 0
    assert train.main([*common, "--data", str(image_folder), "--epochs", "2"]) == 2
    assert "epochs=1, not 2" in capsys.readouterr().err
    assert (tmp_path / "t" / "checkpoint.pt").is_file()  # a refused resume keeps the run
    other = tmp_path / "two-classes"
    shutil.copytree(image_folder, other)
    for split in ("train", "test"):
        shutil.rmtree(other / split / "class2")
    assert train.main([*common, "--data", str(other), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on other data" in err[0]


def test_training_another_architecture_into_the_same_folder_is_refused(run, image_folder,
                                                                       tmp_path, capsys):
    common = ["--data", str(image_folder), "--runs-dir", str(tmp_path), "--name", "t",
              "--batch-size", "32", "--no-progress", "--epochs", "1"]
    assert train.main([str(run / "best.yaml"), *common]) == 0
    assert train.main(["mobilenet_v3_small", *common]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the checkpoint is the file at fault, and the line names it first (not the config)
    assert err[-1].startswith(f"nas.train: error: {tmp_path / 't' / 'checkpoint.pt'}: ")
    assert "another architecture" in err[-1]


def test_export_into_a_missing_folder_is_one_line(run, tmp_path, capsys):
    assert export.main([str(run), "-o", str(tmp_path / "nope" / "a.yaml")]) == 2
    assert "does not exist" in one_line_error(capsys, "nas.export", "-o")


@pytest.mark.parametrize("final_map, total_stride", [(2, 16), (1, 32)])
def test_export_rebuilds_the_strides_the_checkpoint_was_trained_with(tmp_path, final_map,
                                                                     total_stride):
    arch = load_architecture("mobilenet_v3_small")
    cfg = train.TrainConfig(final_map=final_map)
    trained = train.trained_arch(arch, cfg, 32)
    assert trained.total_stride == total_stride
    torch.manual_seed(0)
    model = build_model(trained, num_classes=10).eval()
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"arch": arch.to_json(), "config": json.dumps(cfg.__dict__),
                "model": model.state_dict()}, ckpt)
    pt = export.network_bytes(arch, num_classes=10, input_size=32, checkpoint=ckpt, onnx=False,
                              torchscript=True)["torchscript"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(io.BytesIO(pt))(x), model(x))


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    from nas import files

    target = tmp_path / "checkpoint.pt"
    files.write_atomic(target, b"old")
    assert target.read_bytes() == b"old"

    def interrupted_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(target, "new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.parametrize("extra, fragment", [
    (["--lr", "nan"], "--lr nan"), (["--lr", "inf"], "--lr inf"), (["--lr", "0"], "--lr 0"),
    (["--epochs", "0"], "--epochs 0"), (["--seed", "-1"], "--seed -1"),
    (["--seed", str(2**64)], "--seed"), (["--batch-size", "1000"], "--batch-size 1000"),
    (["--clip-grad", "inf"], "--clip-grad inf"), (["--clip-grad", "nan"], "--clip-grad nan"),
    (["--clip-grad", "-1"], "--clip-grad -1"),
    (["--name", "../up"], "--name")])
def test_train_refuses_bad_flags_before_making_any_folder(run, image_folder, tmp_path, capsys,
                                                         extra, fragment):
    runs = tmp_path / "runs"
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(runs), "--batch-size", "32", "--epochs", "1", "--no-progress",
                       *extra]) == 2
    one_line_error(capsys, "nas.train", fragment)
    assert not any(tmp_path.iterdir())


def test_a_diverged_run_leaves_no_folder_it_made(run, image_folder, tmp_path, capsys):
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(tmp_path / "a" / "runs"), "--batch-size", "32", "--epochs", "1",
                       "--lr", "1e30", "--no-progress"]) == 2
    assert "diverged" in one_line_error(capsys, "nas.train", "--lr")
    assert not any(tmp_path.iterdir())  # neither the run folder nor the runs folders made for it


@pytest.mark.parametrize("runs_dir, name", [("afile/runs", "t"), (".", "afile")])
def test_train_with_a_file_in_the_way_of_the_run_folder_is_one_line(
        run, image_folder, tmp_path, capsys, runs_dir, name):
    (tmp_path / "afile").write_text("mine")
    assert train.main([str(run / "best.yaml"), "--data", str(image_folder), "--runs-dir",
                       str(tmp_path / runs_dir), "--name", name, "--batch-size", "32",
                       "--epochs", "1", "--no-progress"]) == 2
    one_line_error(capsys, "nas.train", "--runs-dir")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("outputs, flag", [
    ({"-o": "d.yaml"}, "-o"),
    ({"-o": "e.yaml", "--torchscript": "d.yaml"}, "--torchscript"),
    ({"-o": "e.yaml", "--torchscript": "e.pt", "--onnx": "d.yaml"}, "--onnx"),
    ({"-o": "e.yaml", "--onnx": "e.pt", "--torchscript": "e.pt"}, "--torchscript")])
def test_export_checks_every_output_before_writing_any(run, tmp_path, capsys, outputs, flag):
    (tmp_path / "d.yaml").mkdir()
    argv = [str(run)] + [arg for f, name in outputs.items() for arg in (f, str(tmp_path / name))]
    assert export.main(argv) == 2
    one_line_error(capsys, "nas.export", flag)
    assert [p.name for p in tmp_path.iterdir()] == ["d.yaml"]
    assert not any((tmp_path / "d.yaml").iterdir())


def test_a_failed_write_removes_the_files_this_export_wrote(run, tmp_path, capsys, monkeypatch):
    real = export.write_atomic

    def full_disk_for_networks(path, data):
        if path.suffix == ".pt":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(export, "write_atomic", full_disk_for_networks)
    assert export.main([str(run), "-o", str(tmp_path / "e.yaml"), "--torchscript",
                        str(tmp_path / "e.pt")]) == 2
    assert "No space left" in one_line_error(capsys, "nas.export", "--torchscript")
    assert not any(tmp_path.iterdir())  # e.yaml was written first, then removed


@pytest.mark.parametrize("tool", [export, plot])
@pytest.mark.parametrize("url", ["foo://bar", "sqlite:///{tmp}/nope/x.db", "sqlite:///{tmp}/x.db"])
def test_a_bad_storage_url_is_one_line_and_creates_nothing(run, tmp_path, capsys, tool, url):
    url = url.format(tmp=tmp_path)
    out = ["-o", str(tmp_path / "a.yaml")] if tool is export else []
    assert tool.main([str(run), "--storage", url, *out]) == 2
    one_line_error(capsys, tool.__name__, f"--storage {url}")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("tool", [export, plot])
@pytest.mark.parametrize("content, fragment", [
    ("[1, 2]", "run.json: expected a JSON object"), ('{"settings": 3}', "run.json: settings"),
    (None, "no study.db")])
def test_a_damaged_run_folder_is_one_line_and_gets_no_new_files(run, tmp_path, capsys, tool,
                                                                content, fragment):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "run.json").write_text((run / "run.json").read_text() if content is None
                                     else content)
    out = ["-o", str(tmp_path / "a.yaml")] if tool is export else []
    assert tool.main([str(folder), *out]) == 2
    one_line_error(capsys, tool.__name__, fragment)
    assert [p.name for p in tmp_path.rglob("*")] == ["r", "run.json"]


@pytest.mark.parametrize("make", [lambda p: p.write_text("stem: {}"),
                                  lambda p: torch.save({"model": {}}, p)])
def test_export_with_a_file_that_is_no_checkpoint_is_one_line(run, tmp_path, capsys, make):
    ckpt = tmp_path / "c.yaml"
    make(ckpt)
    assert export.main([str(run), "-o", str(tmp_path / "e.yaml"), "--torchscript",
                        str(tmp_path / "e.pt"), "--checkpoint", str(ckpt)]) == 2
    assert "not a nas.train checkpoint" in one_line_error(capsys, "nas.export", "--checkpoint")
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]


@pytest.mark.parametrize("size, network", [("-3", True), ("0", True), ("31", True),
                                           ("-3", False), ("64", False)])
def test_export_input_size_is_checked_up_front(run, tmp_path, capsys, size, network):
    net = ["--torchscript", str(tmp_path / "e.pt")] if network else []
    assert export.main([str(run), "-o", str(tmp_path / "e.yaml"), "--input-size", size,
                        *net]) == 2
    one_line_error(capsys, "nas.export", f"--input-size {size}" if int(size) < 32
                    else "--input-size")
    assert not any(tmp_path.iterdir())


def _help_entries(tool, capsys, monkeypatch) -> dict[str, str]:
    """--help as {first option string: its whole entry}, unwrapped."""
    monkeypatch.setenv("COLUMNS", "300")
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    entries: dict[str, str] = {}
    key = None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            key = line.split()[0].rstrip(",")
            entries[key] = line
        elif key and line.startswith("    "):
            entries[key] += " " + line.strip()
    return entries


@pytest.mark.parametrize("tool", [export, plot, train])
def test_help_states_each_default_once(tool, capsys, monkeypatch):
    entries = _help_entries(tool, capsys, monkeypatch)
    assert "--storage" in entries or "--epochs" in entries  # parsed the options
    for entry in entries.values():
        assert entry.count("(default:") <= 1, entry


def test_train_help_shows_every_default(capsys, monkeypatch):
    entries = _help_entries(train, capsys, monkeypatch)
    for flag, default in (("--epochs", 30), ("--batch-size", 128), ("--lr", 0.1), ("--seed", 0),
                          ("--device", "cpu"), ("--runs-dir", "runs")):
        assert f"(default: {default})" in entries[flag], entries[flag]


def test_help_states_no_default_for_a_switch(capsys, monkeypatch):
    """A switch's default is its opposite: `--no-latency ... (default: True)` read as on."""
    entries = _help_entries(confirm, capsys, monkeypatch)
    for flag in ("--no-latency", "--match-latency", "--no-progress"):
        assert "(default:" not in entries[flag], entries[flag]
    assert "(default: 20)" in entries["--epochs"]  # values still state theirs
