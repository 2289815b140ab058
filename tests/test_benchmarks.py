"""What the benchmarks' committed tables depend on: the fidelity benchmark's budget names and
merging, and the variants the fastconv and throughput benchmarks compare."""

import importlib.util
import json
import os
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import sigterm_once

from nas.arch import load_architecture
from nas.data import DataSplits, ImageDataset
from nas.fastconv import MatmulConv2d
from nas.model import build_model
from nas.proxy import ProxyBudget, proxy_arch


def _benchmark(name: str):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


fidelity = _benchmark("proxy_fidelity")


def test_budget_names_replace_only_the_fields_they_name():
    b = fidelity.parse_budget("fm2 4000x3 b128 g2 lr0.003")
    assert (b.final_map, b.train_images, b.epochs, b.batch_size, b.ghost_batches, b.lr) == (
        2, 4000, 3, 128, 2, 0.003)
    assert (b.optimizer, b.weight_decay) == ("adamw", 0.05)  # BASE's, not today's default
    # a name means what it meant when its results were stored, whatever the defaults are now
    plain = fidelity.parse_budget("fm1 40000x8")
    assert (plain.batch_size, plain.ghost_batches, plain.lr) == (64, 1, 2e-3)
    assert fidelity.parse_budget("fm1 16000x2 @zen4") == fidelity.parse_budget("fm1 16000x2")
    with pytest.raises(SystemExit, match="token 'x2'"):
        fidelity.parse_budget("fm1 x2")
    # sgd brings nas.train's optimizer with its learning rate and weight decay, wherever lr is
    sgd = fidelity.parse_budget("lr0.05 fm1 8000x2 sgd")
    assert (sgd.optimizer, sgd.lr, sgd.weight_decay) == ("sgd", 0.05, 5e-4)
    assert fidelity.parse_budget("fm1 8000x2 adamw") == fidelity.parse_budget("fm1 8000x2")
    # the confirmation's training as a reference: nas.train's recipe on the proxy's network form
    ref = fidelity.parse_budget("train e20 @zen4")
    assert (type(ref).__name__, ref.epochs, ref.final_map, ref.lr) == ("TrainConfig", 20, 1, 0.1)
    assert ref.clip_grad is None  # the committed references trained unclipped
    assert fidelity.parse_budget("train e20 clip1").clip_grad == 1.0


ARCHS = [load_architecture(n).to_dict() for n in ("mnasnet_a1", "mobilenet_v2")]


def test_a_tagged_merge_becomes_columns_beside_this_run(tmp_path):
    other = tmp_path / "other.json"
    result = {"0|fm1 8000x2": {"accuracy": 0.3, "seconds": 20.0}}
    other.write_text(json.dumps({"archs": ARCHS, **result}))
    assert fidelity.merged_state(str(other), ARCHS) == result
    assert fidelity.merged_state(f"{other}@zen4", ARCHS[:1]) == {
        "0|fm1 8000x2 @zen4": {"accuracy": 0.3, "seconds": 20.0}}
    # results are keyed by index: another run's of other architectures must not pair up
    with pytest.raises(SystemExit, match="other architectures"):
        fidelity.merged_state(str(other), ARCHS[::-1])
    # a run of our first architectures only (named networks were added after them) merges
    assert fidelity.merged_state(str(other), ARCHS + ARCHS[:1]) == result
    other.write_text(json.dumps(result))  # a file that does not say which they were
    with pytest.raises(SystemExit, match="does not list them"):
        fidelity.merged_state(str(other), ARCHS)


def test_a_state_keeps_the_architectures_its_results_belong_to():
    import argparse

    args = argparse.Namespace(space="tiny", archs=2, seed=0, reference_networks="")
    sampled = fidelity.state_archs({}, args, "s.json")  # a new state: sampled from the space
    assert len(sampled) == 2
    named = fidelity.state_archs({}, argparse.Namespace(
        space="tiny", archs=2, seed=0, reference_networks="mobilenet_v2"), "s.json")
    assert named[:2] == sampled and named[2] == load_architecture("mobilenet_v2")
    stored = {"archs": ARCHS, "0|fm1 8000x2": {"accuracy": 0.3, "seconds": 20.0}}
    kept = fidelity.state_archs(stored, args, "s.json")  # not sampled again: the space may
    assert [a.to_dict() for a in kept] == ARCHS  # have changed since the results were stored
    args.archs = 3
    with pytest.raises(SystemExit, match="--archs 3: s.json holds 2 architectures"):
        fidelity.state_archs(stored, args, "s.json")
    with pytest.raises(SystemExit, match="results without the architectures"):
        fidelity.state_archs({"0|fm1 8000x2": {"accuracy": 0.3}}, args, "s.json")


def test_a_state_keeps_its_named_networks_after_the_sampled_ones(tmp_path):
    import argparse

    v2 = load_architecture("mobilenet_v2").to_dict()
    stored = {"archs": [*ARCHS, v2], "named": 1}
    resume = argparse.Namespace(space="tiny", archs=2, seed=0, reference_networks="")
    kept = fidelity.state_archs(stored, resume, "s.json")  # no flag needed to keep them
    assert [a.to_dict() for a in kept] == [*ARCHS, v2]
    with pytest.raises(SystemExit, match="holds 1 named networks"):
        fidelity.state_archs(stored, argparse.Namespace(
            space="tiny", archs=2, seed=0, reference_networks="mobilenet_v2,mnasnet_a1"),
            "s.json")
    resume.archs = 1  # results are keyed by position: the named one's index would move
    with pytest.raises(SystemExit, match="pass --archs 2"):
        fidelity.state_archs(stored, resume, "s.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"archs": ARCHS, "named": 0, "0|x": {"accuracy": 0.5}}))
    assert "named" not in fidelity.merged_state(str(other), [*ARCHS, v2])


def test_a_plain_fidelity_run_writes_nothing_under_the_committed_results():
    args = fidelity.build_parser().parse_args([])
    assert args.out is None  # printed; written only where --out says
    assert Path(args.state).parts[0] == "runs"  # ignored by git, not benchmarks/results/


@pytest.mark.parametrize("name", ["proxy_fidelity", "proxy_fidelity_cascadelake",
                                  "proxy_fidelity_cascadelake_clean",
                                  "proxy_fidelity_ghost_cascadelake",
                                  "proxy_fidelity_train_zen4", "proxy_fidelity_clip_zen3"])
def test_committed_fidelity_results_list_the_architectures_of_their_tables(name):
    results = Path(__file__).parent.parent / "benchmarks" / "results"
    state = json.loads((results / f"{name}.json").read_text())
    rows = re.findall(r"^\s*(\d+) (\S.{69})", (results / f"{name}.txt").read_text(), re.M)
    assert rows and len(state["archs"]) == len(rows)
    for i, shown in rows:  # the table shows each architecture's first 70 characters
        arch = fidelity.Architecture.from_dict(state["archs"][int(i)])
        assert arch.to_str()[:70].strip() == shown.strip()


def test_twin_agreement_compares_each_tagged_budget_with_its_untagged_twin():
    base = [0.30, 0.35, 0.25, 0.40]
    twin = [0.36, 0.33, 0.26, 0.45]  # one pair swapped: 5 of 6 pairs concordant -> tau 2/3
    state = {f"{i}|fm1 8000x2": {"accuracy": a} for i, a in enumerate(base)}
    state |= {f"{i}|fm1 8000x2 @x": {"accuracy": a} for i, a in enumerate(twin)}
    names = ["fm1 8000x2", "fm1 8000x2 @x", "fm2 40000x2"]
    lines = fidelity.twin_agreement(4, names, state)
    assert "kendall tau 0.667" in lines[-1]
    assert "median 0.0350 max 0.0600" in lines[-1]
    assert fidelity.twin_agreement(4, ["fm1 8000x2 @x", "fm2 40000x2"], state) == []


def test_the_mean_of_twin_runs_is_ranked_against_the_reference():
    # each run alone swaps one pair; their mean ranks as the reference does (tau 1)
    base, twin, ref = [0.30, 0.36, 0.25, 0.40], [0.36, 0.33, 0.26, 0.45], [0.5, 0.6, 0.4, 0.7]
    state = {f"{i}|fm1 8000x2": {"accuracy": a} for i, a in enumerate(base)}
    state |= {f"{i}|fm1 8000x2 @x": {"accuracy": a} for i, a in enumerate(twin)}
    state |= {f"{i}|train e20": {"accuracy": a} for i, a in enumerate(ref)}
    lines = fidelity.twin_agreement(4, ["fm1 8000x2", "fm1 8000x2 @x", "train e20"], state,
                                    "train e20")
    assert lines[-1].startswith("    their mean against 'train e20': kendall tau 1.000")
    assert lines[-1].endswith("n 4")
    state["2|fm1 8000x2 @x"]["accuracy"] = float("nan")  # a failed run: left out, not paired
    lines = fidelity.twin_agreement(4, ["fm1 8000x2", "fm1 8000x2 @x", "train e20"], state,
                                    "train e20")
    assert lines[-1].endswith("n 3")


def test_the_references_early_epochs_are_ranked_against_its_last():
    # 4 networks, 3 epochs: epoch 1 ranks them backwards, epoch 2 as the end does
    histories = [[0.40, 0.50, 0.60], [0.30, 0.55, 0.70], [0.20, 0.60, 0.80], [0.10, 0.65, 0.90]]
    state = {f"{i}|train e3": {"accuracy": h[-1], "history": h, "epoch_seconds": [10, 20, 30]}
             for i, h in enumerate(histories)}
    lines = fidelity.early_epochs(4, state, "train e3")
    assert len(lines) == 2  # epochs 1 and 2 of EARLY_EPOCHS; not the last epoch itself
    first, second = (line.split() for line in lines)
    assert first[:3] == ["reference", "epoch", "1"] and float(first[3]) == 10.0
    assert float(first[4]) == -1.0 and float(second[4]) == 1.0 and float(second[3]) == 30.0
    assert first[-1] == "4"
    # references without a history (proxy budgets, older states) give no rows
    assert fidelity.early_epochs(4, {f"{i}|x": {"accuracy": 0.5} for i in range(4)}, "x") == []


def test_the_fastconv_benchmark_varies_only_how_the_same_network_computes():
    steps = _benchmark("fastconv_steps")
    arch = proxy_arch(load_architecture("mnasnet_a1"), ProxyBudget(), 32)
    models = {v: steps.model_for(v, arch) for v in steps.VARIANTS}
    swapped = {v: [m for m in model.modules() if isinstance(m, MatmulConv2d)]
               for v, model in models.items()}
    assert swapped["fastconv"] and all(m.own_depthwise_grad for m in swapped["fastconv"])
    assert swapped["depthwise wgrad by oneDNN"]
    assert not any(m.own_depthwise_grad for m in swapped["depthwise wgrad by oneDNN"])
    assert swapped["every conv by oneDNN"] == []
    first = models["fastconv"].state_dict()
    for model in models.values():  # same seed, same parameters
        assert all(torch.equal(first[k], v) for k, v in model.state_dict().items())


def test_the_cpu_speed_verdict_follows_the_compute_probe_spread():
    speed = _benchmark("cpu_speed")
    rng = np.random.default_rng(0)
    t = np.linspace(0.0, 10.0, 500)
    swing = np.where((t // 2) % 2 == 0, 1.0, 1.8)  # the core runs at full or ~half speed
    network = 30.0 * swing + rng.normal(0, 0.3, t.size)
    steady = {"compute": 0.8 + rng.normal(0, 0.005, t.size), "memory": np.full(t.size, 8.0),
              "network": network, "t": t}
    swinging = {**steady, "compute": 0.8 * swing + rng.normal(0, 0.005, t.size)}
    assert "-> steady" in speed.report(steady, "x")[-1]
    lines = speed.report(swinging, "x")
    assert "NOT steady" in lines[-1]
    assert 1.75 < float(re.search(r"p90/p10 ([0-9.]+)", lines[-1]).group(1)) < 1.85
    compute = next(line for line in lines if line.startswith("compute"))
    assert float(compute.split()[-1]) > 0.95  # the network follows the probe
    assert speed.window_medians(network, t).max() / speed.window_medians(network, t).min() > 1.7


def test_the_throughput_benchmark_trains_one_network_in_each_pipeline():
    """Plain and ours start from the same weights; ours differs in how it computes (nas.fastconv)
    and its memory format, ours-nchw only in the memory format."""
    bench = _benchmark("proxy_throughput")
    arch = proxy_arch(load_architecture("mnasnet_a1"), ProxyBudget(), 32)
    gen = torch.Generator().manual_seed(0)
    split = ImageDataset(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen),
                         torch.arange(8) % 2)
    data = DataSplits(train=split, val=split, test=split, classes=("a", "b"), source="t")
    torch.manual_seed(0)
    plain = build_model(arch, num_classes=10)
    torch.manual_seed(0)
    ours, it = bench.ours(arch, data, 4, gen)
    torch.manual_seed(0)
    nchw, it_nchw = bench.ours(arch, data, 4, gen, channels_last=False)
    assert any(isinstance(m, MatmulConv2d) for m in ours.modules())
    assert not any(isinstance(m, MatmulConv2d) for m in plain.modules())
    for model in (ours, nchw):
        theirs = model.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in plain.state_dict().items())
    x, y = next(it)
    assert x.shape == (4, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
    assert next(it_nchw)[0].is_contiguous() and y.dtype == torch.int64


def test_the_step_profile_splits_step_time_into_per_step_and_per_image_costs():
    step_profile = _benchmark("step_profile")
    fixed, per_image = step_profile.fit_line([8.0, 16.0, 64.0], [66.0 + 1.5 * b for b in
                                                                 (8, 16, 64)])
    assert fixed == pytest.approx(66.0) and per_image == pytest.approx(1.5)


def test_a_benchmark_table_is_printed_and_kept_whole_in_a_folder_made_for_it(tmp_path, capsys):
    from nas.files import save_table

    out = tmp_path / "results" / "new" / "table.txt"
    assert save_table("# head\nrow 1", out) == out
    assert out.read_text() == "# head\nrow 1\n" and capsys.readouterr().out == "# head\nrow 1\n"
    save_table("again", out)  # replaced, not appended
    assert out.read_text() == "again\n" and not list(out.parent.glob(".*tmp"))
    capsys.readouterr()
    assert save_table("only shown", None) is None  # no --out: printed, nothing written
    assert capsys.readouterr().out == "only shown\n" and out.read_text() == "again\n"


def test_the_outcome_verdict_reads_a_gap_at_the_test_splits_resolution():
    outcome = _benchmark("search_outcome")
    df = pd.DataFrame({"network": ["trial-6", "mobilenet_v2@0.85", "mnasnet_a1@0.9"],
                       "kind": ["candidate", "matched", "matched"], "seeds": [2, 2, 2],
                       "latency_ms": [5.51, 5.67, 5.73],
                       "test_accuracy_mean": [np.mean([0.7905, 0.7845]),  # seed means as
                                              np.mean([0.7629, 0.7921]), 0.7876],  # confirm's
                       "matched_to": ["", "trial-6 (-1.4%)", "trial-6 (-1.7%)"]})
    assert 100 * (df.test_accuracy_mean[0] - df.test_accuracy_mean[1]) < 1.0  # a float hair short
    assert outcome.verdict(df) == [
        "trial-6 (5.51 ms, 78.75%) vs mobilenet_v2@0.85 (5.67 ms, 77.75%): +1.00 points "
        "(goal met)",
        "trial-6 (5.51 ms, 78.75%) vs mnasnet_a1@0.9 (5.73 ms, 78.76%): -0.01 points "
        "(short of +1.0)"]


def test_the_outcome_compares_at_the_candidate_s_latency_between_a_family_s_trained_widths():
    outcome = _benchmark("search_outcome")
    df = pd.DataFrame({"network": ["trial-53", "trial-54", "mobilenet_v2@1.1", "mobilenet_v2@1.15",
                                   "mobilenet_v2", "mnasnet_a1@1.1", "mnasnet_a1@1.15"],
                       "kind": ["candidate", "candidate", "matched", "matched", "baseline",
                                "matched", "matched"],
                       "seeds": [2, 1, 2, 2, 2, 2, 0],
                       "latency_ms": [12.0, 7.0, 10.0, 14.4, 9.0, 10.5, 13.0],
                       "test_accuracy_mean": [0.8326, 0.81, 0.7958, 0.8158, 0.79, 0.7953, np.nan],
                       "matched_to": ["", "", "trial-53 (-17%)", "trial-53 (+20%)", "", "", ""]})
    # 12 ms is halfway between 10 and 14.4 ms in log latency: the mean of the two widths, 80.58%;
    # mnasnet_a1's slower width is untrained and trial-54 is faster than every trained width
    assert outcome.at_equal_latency(df) == [
        "", "at equal latency, where a family has trained widths on both sides of a candidate "
            "(accuracy linear in log latency between the nearest two):",
        "trial-53 (12.00 ms, 83.26%) vs mobilenet_v2 at 12.00 ms: 80.58% (between "
        "mobilenet_v2@1.1 10.00 ms 79.58% and mobilenet_v2@1.15 14.40 ms 81.58%): +2.68 points "
        "(goal met)"]
    assert outcome.at_equal_latency(df[df.network != "mobilenet_v2@1.15"]) == []


def test_the_search_outcome_benchmark_confirms_a_real_search_against_matched_baselines(
        image_folder, tmp_path, capsys, monkeypatch):
    outcome = _benchmark("search_outcome")
    out = tmp_path / "table.txt"
    tiny = ("--space tiny --val-size 30 --proxy-images 64 --proxy-batch 32 --input-size 32 "
            "--latency-time 0.1 --proxy-epochs 1 --runtime eager --latency-protocol single")
    assert outcome.main(["--data", str(image_folder), "--trials", "2", "--top", "1",
                         "--epochs", "1", "--seeds", "1", "--space", "tiny", "--batch-size", "32",
                         "--runs-dir", str(tmp_path), "--search-flags", tiny,
                         "--out", str(out)]) == 0
    text = out.read_text()
    confirmed = pd.read_csv(tmp_path / "outcome" / "confirm.csv")
    matched = confirmed[confirmed.kind == "matched"]
    assert sorted(n.split("@")[0] for n in matched.network) == sorted(
        ["mobilenet_v2", "mnasnet_a1", confirmed[confirmed.kind == "baseline"].network.iloc[2]])
    for name in confirmed.network:
        assert name in text
    trials = pd.read_csv(tmp_path / "outcome" / "trials.csv")
    searched = trials[(trials.state == "COMPLETE") & trials.baseline.isna()]
    target = json.loads((tmp_path / "outcome" / "run.json").read_text())["settings"]["target_ms"]
    above = int((searched.latency_ms > target).sum())
    assert f"# search: {above} of {len(searched)} trials above T;" in text
    verdicts = [line for line in text.splitlines() if " vs " in line]
    assert len(verdicts) == 3  # the candidate against each matched family
    cand = confirmed[confirmed.kind == "candidate"].iloc[0]
    b = matched.iloc[0]
    gap = 100 * (cand.test_accuracy_mean - b.test_accuracy_mean)
    assert f"vs {b.network} " in verdicts[0] and f"{gap:+.2f} points" in verdicts[0]
    # the same table from the run folder alone (a confirmation stopped for time)
    again = tmp_path / "again.txt"
    assert outcome.main(["--report-only", "--data", str(image_folder), "--top", "1", "--seeds",
                         "1", "--space", "tiny", "--runs-dir", str(tmp_path),
                         "--out", str(again)]) == 0
    body = again.read_text().split("\n\n", 1)
    assert body[1] == text.split("\n\n", 1)[1]
    assert "trainings finished" in body[0] and "mobilenet_v2 " in body[0]  # refs kept
    assert "gradient norm clipped to 1;" in body[0] and (confirmed.clip_grad == 1.0).all()
    assert outcome.main(["--report-only", "--data", str(image_folder), "--name", "none",
                         "--runs-dir", str(tmp_path)]) == 2
    # the same command again resumes with the run's T: the references are not measured again
    # (that moved T and the study refused it), and nothing is trained again
    monkeypatch.setattr(outcome, "bracketing_target", lambda *a: pytest.fail("measured again"))
    monkeypatch.setattr(outcome, "OUTCOME_JSON", "lost.json")  # an outcome.json without "v3"
    assert outcome.main(["--data", str(image_folder), "--trials", "2", "--top", "1",
                         "--epochs", "1", "--seeds", "1", "--space", "tiny", "--batch-size", "32",
                         "--runs-dir", str(tmp_path), "--search-flags", tiny]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "outcome" / "confirm.csv"), confirmed)
    # carried to another machine (a session on another VM): the trainings still missing are
    # trained at the latencies and widths kept, and nothing is measured or searched
    run = tmp_path / "outcome"
    missing = confirmed[confirmed.kind == "matched"].network.iloc[0]
    shutil.rmtree(run / "confirm" / outcome.training_name(missing))
    for ckpt in run.rglob("*.pt"):
        ckpt.unlink()
    monkeypatch.setattr("nas.latency.cpu_name", lambda: "Another CPU (family 1 model 2, avx2)")
    monkeypatch.setattr(outcome, "search", lambda *a: pytest.fail("searched again"))
    carried = ["--no-latency", "--data", str(image_folder), "--top", "1", "--epochs", "1",
               "--seeds", "1", "--space", "tiny", "--batch-size", "32", "--runs-dir",
               str(tmp_path)]
    assert outcome.main(carried) == 0
    again = pd.read_csv(run / "confirm.csv")
    assert list(again.network) == list(confirmed.network) and (again.seeds == 1).all()
    assert list(again.latency_ms) == pytest.approx(list(confirmed.latency_ms))
    assert outcome.main([*carried[:-1], str(tmp_path / "elsewhere")]) == 2


def test_the_outcome_target_is_on_the_search_s_own_yardstick(monkeypatch):
    """T and the bracketing MobileNetV3 come from the protocol the search measures by: raw
    milliseconds on a VM whose speed swings are another yardstick than the study's."""
    outcome = _benchmark("search_outcome")
    monkeypatch.setattr(outcome, "load_architecture", lambda name: name)
    monkeypatch.setattr(outcome, "build_model", lambda name, num_classes: name)
    ratio = {"mobilenet_v3_small": 2.0, "mobilenet_v3_large": 4.0, "mobilenet_v2": 8.0}
    raw = {"mobilenet_v3_small": 2.0, "mobilenet_v3_large": 9.0, "mobilenet_v2": 8.0}
    monkeypatch.setattr(outcome, "measure_interleaved",
                        lambda m, *a, **kw: SimpleNamespace(latency_ms=ratio[m]))
    monkeypatch.setattr(outcome, "measure_latency",
                        lambda m, *a, **kw: SimpleNamespace(median_ms=raw[m]))
    draft = SimpleNamespace(latency_protocol="interleaved", input_size=224, device="cpu",
                            threads=1, runtime="onnxruntime", precision="fp32",
                            latency_warm_runs=2)
    assert outcome.bracketing_target(draft, 10) == (4.0, "mobilenet_v3_large", ratio)
    single = SimpleNamespace(**{**vars(draft), "latency_protocol": "single"})
    assert outcome.bracketing_target(single, 10) == (4.0, "mobilenet_v3_small", raw)
    # a --target-ms of the user's picks the MobileNetV3 nearest it, not the default T
    assert outcome.bracketing_target(draft, 10, 3.5) == (3.5, "mobilenet_v3_large", ratio)
    assert outcome.bracketing_target(single, 10, 7.5) == (7.5, "mobilenet_v3_large", raw)


def test_sigterm_stops_the_search_outcome_in_one_line_and_keeps_the_confirmation_table(
        image_folder, tmp_path):
    # the benchmark runs for hours: a scheduler's time limit (SIGTERM) used to kill it without
    # writing confirm.csv; now the table is written and the status is the shell's 143
    tiny = ("--space tiny --val-size 30 --proxy-images 64 --proxy-batch 32 --input-size 32 "
            "--latency-time 0.1 --proxy-epochs 1 --runtime eager --latency-protocol single")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "search_outcome.py"
    confirm_dir = tmp_path / "outcome" / "confirm"
    status, out, err = sigterm_once(
        [sys.executable, str(script), "--data", str(image_folder), "--trials", "2", "--top",
         "1", "--epochs", "500", "--seeds", "1", "--space", "tiny", "--batch-size", "32",
         "--runs-dir", str(tmp_path), "--search-flags", tiny],
        ready=lambda: bool(list(confirm_dir.glob("*/*/seed0/checkpoint.pt"))))
    assert status == 143, (out, err)
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "search_outcome.py: interrupted (SIGTERM)"
    confirmed = pd.read_csv(tmp_path / "outcome" / "confirm.csv")
    assert "candidate" in set(confirmed.kind) and confirmed.seeds.max() == 0  # none finished


def test_the_outcome_report_names_the_recipe_its_confirm_csv_trained_with():
    outcome = _benchmark("search_outcome")
    assert outcome.recipe_clip(pd.DataFrame({"network": ["trial-3"]})) == 0.0  # before clipping
    assert outcome.recipe_clip(pd.DataFrame({"network": ["trial-3"], "clip_grad": [1.0]})) == 1.0


def test_the_outcome_report_counts_a_width_1_match_and_its_baseline_as_one_training():
    outcome = _benchmark("search_outcome")
    df = pd.DataFrame({"network": ["trial-3", "trial-7", "mobilenet_v3_small",
                                   "mobilenet_v3_small@1", "mobilenet_v2@0.5"],
                       "kind": ["candidate", "candidate", "baseline", "matched", "matched"],
                       "seeds": [2, 0, 0, 2, 1]})
    assert outcome.trainings(df, seeds=2) == (5, 2 + 1 + 2 + 2, 0)
    # a second seed of the second candidate is counted apart, not against another's missing one
    df.loc[1, "seeds"] = 2
    assert outcome.trainings(df, seeds=2) == (6, 7, 1)


def test_the_ratio_noise_table_splits_the_spread_within_and_between_processes():
    noise = _benchmark("latency_ratio_noise")
    # two processes that agree within themselves and differ from each other by 10%
    runs = [{"a": {"12": {"medians": [1.0, 1.0, 1.0], "seconds": 2.0}}},
            {"a": {"12": {"medians": [1.1, 1.1, 1.1], "seconds": 4.0}}}]
    row = noise.spread(runs, "a", "12", repeats=3)
    assert row["within"] == 0.0 and row["sd_of_mean"] == 0.0
    assert row["between"] == pytest.approx(0.1 / 1.05) and row["medians"] == [1.0, 1.1]
    assert row["seconds"] == 3.0
    # one process that wanders: the within-process sd is pooled over processes, of the mean
    runs[1]["a"]["12"]["medians"] = [0.9, 1.1, 1.3]
    row = noise.spread(runs, "a", "12", repeats=3)
    assert row["within"] == pytest.approx(np.sqrt(0.04 / 2) / (6.3 / 6))
    assert row["sd_of_mean"] == pytest.approx(row["within"] / np.sqrt(3))
    assert row["between"] == pytest.approx(0.1 / 1.05)


def test_the_aa_summary_measures_rank_agreement_and_the_largest_drift():
    aa = _benchmark("latency_aa")
    passes = [{"a": {"ms": 1.0, "seconds": 1}, "b": {"ms": 2.0, "seconds": 1},
               "c": {"ms": 3.0, "seconds": 3}},
              {"a": {"ms": 1.1, "seconds": 1}, "b": {"ms": 3.5, "seconds": 1},
               "c": {"ms": 3.0, "seconds": 1}}]
    s = aa.summarize(passes)
    assert s["spearman_min"] == pytest.approx(0.5)  # b and c swapped places
    assert s["drift_worst"] == "b" and s["drift_max"] == pytest.approx(1.5 / 2.75)
    assert s["seconds"] == pytest.approx(8 / 6)
    # b and c swapped: their medians (2.75, 3.0) are 9.1% apart; a and the others never did
    assert s["swap_gap_max"] == pytest.approx(0.25 / 2.75)
    # the widest swapped gap, not the first: a third pass swaps a and b as well
    passes.append({"a": {"ms": 2.2, "seconds": 1}, "b": {"ms": 2.1, "seconds": 1},
                   "c": {"ms": 3.0, "seconds": 1}})
    assert aa.summarize(passes)["swap_gap_max"] == pytest.approx((2.1 - 1.1) / 1.1)
    assert aa.summarize(passes[:1] * 2)["swap_gap_max"] == 0.0  # agreeing passes: no swap


def test_the_aa_pass_measures_with_the_rounds_asked_for(tmp_path):
    # --rounds reaches the fresh process's interleaved measurement (the knob the drift
    # target is tried with); without it, the protocol's own ROUNDS
    aa = _benchmark("latency_aa")
    from nas.interleaved import ROUNDS
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(["mobilenet_v3_small"]))
    got = [aa.run_pass(specs, "interleaved", "eager", 32, 0, rounds)["mobilenet_v3_small"]
           for rounds in (3, None)]
    assert [g["rounds"] for g in got] == [3, ROUNDS] and ROUNDS != 3
    assert all(g["ms"] > 0 and g["ratio"] > 0 for g in got)


def test_a_pinned_aa_pass_measures_on_the_one_cpu_it_is_given(tmp_path):
    # --pin: the fresh process (and the runtime's threads) on one CPU; unpinned, where the
    # parent may run
    aa = _benchmark("latency_aa")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(["mobilenet_v3_small"]))
    cpu = max(os.sched_getaffinity(0))
    pinned = aa.run_pass(specs, "interleaved", "eager", 32, 0, 2, cpu=cpu)
    assert pinned["mobilenet_v3_small"]["cpus"] == [cpu]
    free = aa.run_pass(specs, "interleaved", "eager", 32, 0, 2)
    assert free["mobilenet_v3_small"]["cpus"] == sorted(os.sched_getaffinity(0))


def test_the_aa_pass_measures_every_network_in_each_sitting_asked_for(tmp_path):
    # --sittings 2: each network twice per process, the first sitting its result, both kept
    aa = _benchmark("latency_aa")
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps(["mobilenet_v3_small", "mnasnet_b1"]))
    got = aa.run_pass(specs, "interleaved", "eager", 32, 0, 2, sittings=2)
    for m in got.values():
        assert len(m["sittings_ms"]) == 2 and m["sittings_ms"][0] == m["ms"]
        assert all(ms > 0 for ms in m["sittings_ms"]) and m["sittings_s"][0] == m["seconds"]
    # the rows: the first sitting as measured, and each network's mean over its sittings
    passes = [{"a": {"ms": 2.0, "seconds": 1, "sittings_ms": [2.0, 2.4],
                     "sittings_s": [1, 2], "reference_ms": 4.0}},
              {"a": {"ms": 2.2, "seconds": 1, "sittings_ms": [2.2, 2.2],
                     "sittings_s": [1, 1], "reference_ms": 4.4}}]
    v = aa.variants(passes, "interleaved")
    assert list(v) == ["interleaved 1st", "  mean of 2", "  1st, ratio only",
                       "  mean of 2, ratio"]
    assert [p["a"]["ms"] for p in v["interleaved 1st"]] == [2.0, 2.2]
    assert [p["a"]["ms"] for p in v["  mean of 2"]] == pytest.approx([2.2, 2.2])
    assert aa.summarize(v["  mean of 2"])["seconds"] == pytest.approx(2.5)
    # without each process's yardstick: 2.0 / 4.0 and 2.2 / 4.4 are the same ratio
    assert [p["a"]["ms"] for p in v["  1st, ratio only"]] == pytest.approx([0.5, 0.5])
    assert [p["a"]["ms"] for p in v["  mean of 2, ratio"]] == pytest.approx([0.55, 0.5])
    assert list(aa.variants(passes, "current")) == ["current 1st", "  mean of 2"]

def test_the_sittings_benchmark_times_back_to_back_sittings_and_their_drift():
    sit = _benchmark("reference_sittings")
    got = sit.sittings_worker(2, "eager", 32)
    assert len(got) == 2 and all(ms > 0 for ms in got)
    assert sit.drift([1.0, 1.1, 0.9]) == pytest.approx(0.2)


def test_the_bias_benchmark_compares_interleaved_ratios_with_the_single_protocol_s():
    bias = _benchmark("protocol_bias")
    row = bias.bias_row("mobilenet_v3_small", [0, 1], 32, "eager")
    # mobilenet_v3_small against mnasnet_a1 alone: a fraction of it, not a raw latency
    assert 0.05 < row["single"] < 1.0 and row["cand_ms"] > 0
    for k in (0, 1):
        relative, seconds = row[k]
        assert -0.5 < relative < 0.5 and seconds > 0


def test_the_aa_interleaved_rows_rescale_the_same_ratios_three_ways():
    aa = _benchmark("latency_aa")
    passes = [{"a": {"ms": 2.0, "seconds": 1, "ratio": 0.5, "reference_ms": 4.0,
                     "own_sitting_ms": 4.0}},
              {"a": {"ms": 2.1, "seconds": 1, "ratio": 0.5, "reference_ms": 4.2,
                     "own_sitting_ms": 4.4}}]
    v = aa.variants(passes, "interleaved")
    assert [p["a"]["ms"] for p in v["interleaved"]] == [2.0, 2.1]  # as measured
    assert [p["a"]["ms"] for p in v["  own sitting"]] == [2.0, 2.2]
    assert [p["a"]["ms"] for p in v["  ratio only"]] == [0.5, 0.5]
    assert aa.summarize(v["  ratio only"])["drift_max"] == 0.0
    assert aa.variants(passes, "current") == {"current": passes}
    ladder = [{"a": {"ms": 2.0, "seconds": 1, "ratio": 0.5, "reference_ms": 4.0,
                     "reference": "r@0.5"}},
              {"a": {"ms": 2.4, "seconds": 1, "ratio": 0.5, "reference_ms": 4.8,
                     "reference": "r@0.5"}},
              {"a": {"ms": 2.2, "seconds": 1, "ratio": 0.55, "reference_ms": 4.0,
                     "reference": "r@0.5"}}]
    v = aa.variants(ladder, "ladder")
    assert [p["a"]["ms"] for p in v["ladder"]] == [2.0, 2.4, 2.2]
    assert [p["a"]["ms"] for p in v["  rungs fixed"]] == pytest.approx([2.0, 2.0, 2.2])


def _random_archs(n, seed):
    import optuna

    from nas.space import load_space
    space = load_space("mnasnet")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space.sample(study.ask()) for _ in range(n)]


def test_the_surrogate_counts_block_multiply_adds_as_the_flop_counter_does():
    # count_macs minus the blocks' analytic count leaves only the fixed stem, head and
    # classifier: one value per last-block width, differing by the head conv's 1280 x 7 x 7
    from nas.cost import count_macs
    surrogate = _benchmark("surrogate")
    rest = {}
    for arch in _random_archs(6, seed=3):
        ours = sum(surrogate.block_macs(arch))
        rest.setdefault(arch.blocks[-1].filters, set()).add(
            count_macs(build_model(arch, num_classes=10), 224) - ours)
    assert all(len(v) == 1 for v in rest.values()) and len(rest) >= 2
    (w1, (r1,)), (w2, (r2,)) = sorted(rest.items())[:2]
    assert r2 - r1 == (w2 - w1) * 1280 * 7 * 7


def test_the_surrogate_learns_accuracy_and_latency_it_is_given(tmp_path):
    # a made-up accuracy (more mbconv blocks and wider last blocks score higher) and latency
    # (proportional to multiply-adds): fitted on 120 architectures, it ranks 40 unseen ones
    import json as _json

    from scipy.stats import kendalltau
    surrogate = _benchmark("surrogate")

    def truth(arch):
        acc = 0.1 + 0.03 * sum(b.op == "mbconv" for b in arch.blocks) + \
            arch.blocks[5].filters / 4000
        return acc, sum(surrogate.block_macs(arch)) / 5e7

    archs = _random_archs(160, seed=0)
    rows = [{"arch_dict": _json.dumps(a.to_dict()), "macs": 0, "accuracy": truth(a)[0],
             "latency_ms": truth(a)[1]} for a in archs[:120]]
    csv = tmp_path / "s.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    fitted = surrogate.fit(csv)
    pred = np.array([fitted.predict(a) for a in archs[120:]])
    true = np.array([truth(a) for a in archs[120:]])
    assert kendalltau(pred[:, 0], true[:, 0]).statistic > 0.6
    assert kendalltau(pred[:, 1], true[:, 1]).statistic > 0.8
    assert np.median(np.abs(pred[:, 1] / true[:, 1] - 1)) < 0.15


def test_the_sampler_table_counts_trials_to_random_s_bar_regret_and_hypervolume():
    eff = _benchmark("sampler_efficiency")
    tgt = {"low": 5.0, "mid": 8.0}
    trials = 200

    def run(sampler, seed, acc):
        return {"sampler": sampler, "objective": "hard@low", "seed": seed, "seconds": 1.0,
                "acc": list(acc), "lat": [4.0] * trials}  # under T: hard reward = accuracy

    ramp = np.linspace(0.1, 0.5, trials)  # random: best at 100 trials = ramp[99]
    runs = [run("random", s, ramp) for s in range(3)]
    # tpe reaches random's bar at trial 20 and 0.6 at trial 150
    fast = np.full(trials, 0.1)
    fast[19], fast[149] = ramp[99], 0.6
    runs += [run("tpe", s, fast) for s in range(3)]
    table = eff.summarise(runs, tgt, ref_lat=10.0, trials=trials)
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()
            if line.startswith("| random") or line.startswith("| tpe")}
    assert "| 20 [20-20] |" in rows["tpe"] and "| 100 [100-100] |" in rows["random"]
    # regret against the best any run found (0.6): tpe's at 100 trials is 0.6 - ramp[99]
    assert f"{0.6 - ramp[99]:.4f} [" in rows["tpe"].split(" | ")[4]
    assert "0.0000 [0.0000-0.0000]" in rows["tpe"].split(" | ")[5]
    # hypervolume of two points against (0.10, 10 ms): (0.3 x 6) + (0.1 x 2) boxes, overlap
    assert eff.hypervolume([0.4, 0.5], [4.0, 8.0], 10.0) == pytest.approx(
        (0.4 - 0.1) * (10 - 4) + (0.5 - 0.4) * (10 - 8))


def test_sampler_runs_are_kept_per_sampler_and_a_cut_last_run_is_redone(tmp_path):
    eff = _benchmark("sampler_efficiency")
    runs = [{"sampler": s, "objective": "soft@low", "seed": k, "seconds": 1.0,
             "acc": [0.5], "lat": [3.0]} for s, k in (("gp", 0), ("tpe", 0), ("gp", 1))]
    for r in runs:
        before = (tmp_path / "gp.jsonl.gz").stat().st_size if r["seed"] else 0
        eff.append_run(tmp_path, r)
    assert sorted(f.name for f in tmp_path.iterdir()) == ["gp.jsonl.gz", "tpe.jsonl.gz"]
    assert sorted((r["sampler"], r["seed"]) for r in eff.load_state(tmp_path)) == [
        ("gp", 0), ("gp", 1), ("tpe", 0)]
    gp = tmp_path / "gp.jsonl.gz"
    cut = (before + gp.stat().st_size) // 2  # the session ended inside the last write
    gp.write_bytes(gp.read_bytes()[:cut])
    assert sorted((r["sampler"], r["seed"]) for r in eff.load_state(tmp_path)) == [
        ("gp", 0), ("tpe", 0)]


def test_gp_runs_skip_optuna_s_device_mode_and_sample_the_same_trials(monkeypatch):
    import contextlib

    import optuna
    from optuna.samplers._gp import sampler as gp_sampler
    eff = _benchmark("sampler_efficiency")
    monkeypatch.setattr(gp_sampler, "torch", gp_sampler.torch)  # put back after the test

    def search():
        study = optuna.create_study(sampler=optuna.samplers.GPSampler(seed=0, n_startup_trials=3))
        study.optimize(lambda t: (t.suggest_categorical("a", [1, 2, 3]) - 2) ** 2
                       + t.suggest_float("x", -1, 1) ** 2, n_trials=8)
        return [t.params for t in study.trials]

    plain = search()
    eff._skip_gp_device_mode()
    assert isinstance(gp_sampler.torch.device("cpu"), contextlib.nullcontext)
    assert gp_sampler.torch.float64 is torch.float64
    assert search() == plain


def test_the_real_sampler_comparison_runs_both_searches_and_holds_them_to_random_s_best(
        image_folder, tmp_path):
    real = _benchmark("sampler_real")
    tiny = ("--space tiny --val-size 30 --proxy-images 64 --proxy-batch 32 --input-size 32 "
            "--latency-time 0.1 --proxy-epochs 1 --runtime eager --latency-protocol single "
            "--population 2")
    out = tmp_path / "table.txt"
    assert real.main(["--data", str(image_folder), "--samplers", "evolution,random",
                      "--seeds", "0", "--trials", "3", "--target-ms", "1000",
                      "--runs-dir", str(tmp_path / "runs"), "--search-flags", tiny,
                      "--out", str(out)]) == 0
    text = out.read_text()
    for sampler in ("evolution", "random"):
        trials = pd.read_csv(tmp_path / "table" / f"sampler_{sampler}_s0_trials.csv")
        best = trials["reward"].max()
        row = next(line for line in text.splitlines() if line.startswith(f"| {sampler} | 0 |"))
        assert f"| {best:.4f} |" in row
    random_row = next(line for line in text.splitlines() if line.startswith("| random | 0 |"))
    trials = pd.read_csv(tmp_path / "table" / "sampler_random_s0_trials.csv")
    first = int(np.argmax(np.maximum.accumulate(trials.sort_values("number")["reward"])
                          >= trials["reward"].max())) + 1
    assert random_row.split(" | ")[3] == str(first)  # columns: best @3, then trials to the bar


def test_the_real_sampler_table_says_when_a_search_never_reached_the_bar():
    real = _benchmark("sampler_real")
    curves = {("evolution", 0): np.array([0.1, 0.2, 0.3]), ("random", 0): np.array([0.2, 0.4,
                                                                                   0.4])}
    text = real.summarise(curves, {k: "x" for k in curves}, 3, "random")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in text.splitlines()[2:]}
    assert rows["evolution"][3] == ">3" and rows["random"][3] == "2"


def test_cost_rankings_rank_multiply_adds_and_parameters_against_the_reference():
    archs = [load_architecture(n) for n in ("mobilenet_v3_small", "mobilenet_v2", "mnasnet_a1")]
    # multiply-adds at 224: mobilenet_v3_small < mobilenet_v2 < mnasnet_a1, as the accuracies
    state = {f"{i}|ref": {"accuracy": acc} for i, acc in enumerate((0.1, 0.2, 0.3))}
    macs, params = fidelity.cost_rankings(archs, state, "ref")
    assert macs.split()[:3] == ["multiply-adds", "-", "1.000"] and macs.split()[-1] == "3"
    assert params.split()[0] == "parameters"
    state["1|ref"] = {"accuracy": float("nan")}  # a failed reference leaves too few to rank
    assert fidelity.cost_rankings(archs, state, "ref") == []


def test_the_training_start_variants_each_change_what_they_name():
    start = _benchmark("training_start")
    arch = load_architecture("mnasnet_a1")
    assert any(b.se_ratio for b in arch.blocks) and arch.stem.act == "relu"
    no_se = start.VARIANTS["no-se"][1](arch)
    assert not any(b.se_ratio for b in no_se.blocks) and no_se.settings == arch.settings
    relu6 = start.VARIANTS["relu6"][1](arch)
    assert {relu6.stem.act, relu6.head.act, *(b.act for b in relu6.blocks)} == {"relu6"}
    v3 = start.VARIANTS["v3-se"][1](arch).settings
    assert (v3.se_from, v3.se_gate) == ("expanded", "hardsigmoid") != (arch.settings.se_from,
                                                                       arch.settings.se_gate)
    assert start.VARIANTS["lr0.05"][2] == 0.5 and start.VARIANTS["clip1"][3] == 1.0
    assert start.VARIANTS["as-is"][1](arch) == arch


def test_the_training_start_counts_a_channel_dead_only_if_no_image_wakes_it():
    start = _benchmark("training_start")
    conv = torch.nn.Conv2d(1, 2, 1, bias=True)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor([-1.0, 0.0]))
        conv.weight[1] = 1.0  # channel 1 follows the input: alive where an image is positive
    model = torch.nn.Sequential(conv, torch.nn.ReLU())
    images = -torch.ones(4, 1, 3, 3)
    assert start.dead_share(model, images) == 1.0
    images[2, 0, 1, 1] = 1.0  # one pixel of one image
    assert start.dead_share(model, images) == 0.5
