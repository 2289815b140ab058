"""nas.confirm on a tiny finished search: full trainings of the top candidates and baselines,
latency re-measured together, resumable, bad input as one line."""

import json
import math
import shutil

import optuna
import pandas as pd
import pytest
from conftest import one_line_error

from nas import confirm, export
from nas.arch import load_architecture
from nas.cost import count_params
from nas.interleaved import REFERENCE_ATTR
from nas.model import build_model
from nas.proxy import CandidateFailed
from nas.run_folder import load_run_study
from nas.search import main as search

FAST = ["--epochs", "1", "--batch-size", "32", "--latency-time", "0.1", "--no-progress"]


@pytest.fixture(scope="module")
def searched(image_folder, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert search(["--space", "tiny", "--val-size", "30", "--proxy-images", "64",
                   "--proxy-batch", "32", "--input-size", "32", "--latency-time", "0.1",
                   "--target-ms", "5", "--proxy-epochs", "1", "--runtime", "eager",
                   "--latency-protocol", "single",
                   "--trials", "3", "--sampler", "random", "--baselines", "mobilenet_v3_small",
                   "--data", str(image_folder), "--runs-dir", str(runs), "--name", "s"]) == 0
    return runs / "s"


@pytest.fixture
def run(searched, tmp_path):
    """A copy of the searched run folder, for a test to confirm in."""
    return shutil.copytree(searched, tmp_path / "s")


def metrics(run, network):
    return [json.loads(p.read_text())
            for p in sorted((run / "confirm" / network).glob("*/seed*/metrics.json"))]


def test_confirms_the_top_candidates_and_baselines_and_writes_the_table(run, tmp_path):
    assert confirm.main([str(run), "--top", "2", "--seeds", "2", *FAST]) == 0
    df = pd.read_csv(run / "confirm.csv")
    trials = pd.read_csv(run / "trials.csv")
    done = trials[trials.state == "COMPLETE"].sort_values("reward", ascending=False)
    top = [f"trial-{n}" for n in done.number[:2]]
    assert list(df.network) == [*top, "mobilenet_v3_small"]
    assert list(df.seeds) == [2, 1, 2]  # every seed for the top candidate and the baselines
    for _, row in df.iterrows():
        accs = [m["test_accuracy"] for m in metrics(run, row.network)]
        assert len(accs) == row.seeds
        assert row.test_accuracy_mean == pytest.approx(sum(accs) / len(accs))
        if row.kind == "baseline":
            assert row.params == count_params(build_model(load_architecture(row.network),
                                                          num_classes=3))
        else:
            assert row.params == trials.set_index("number").params[row.trial]
        assert row.latency_ms > 0 and row.epochs == 1
    assert list(df.proxy_accuracy[:2]) == pytest.approx(list(done.accuracy[:2]))
    assert df.test_accuracy_sd[0] == pytest.approx(pd.Series(
        [m["test_accuracy"] for m in metrics(run, top[0])]).std())
    best = df[df.confirmed_best]
    assert len(best) == 1 and best.kind.iloc[0] == "candidate"
    assert best.reward.iloc[0] == df[df.kind == "candidate"].reward.max()
    assert load_architecture(run / "confirmed.yaml").to_str() == best.arch.iloc[0]
    html = (run / "confirm.html").read_text()
    assert "Kendall tau" in html and "mobilenet_v3_small" in html
    # nas.export picks the confirmed best
    out = tmp_path / "picked.yaml"
    assert export.main([str(run), "--confirmed", "-o", str(out)]) == 0
    assert load_architecture(out).to_str() == best.arch.iloc[0]


def test_a_second_call_trains_only_what_is_missing(run, monkeypatch):
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", *FAST]) == 0
    first = pd.read_csv(run / "confirm.csv")
    trained = []
    real = confirm.train

    def counted(arch, folder, cfg, **kw):
        trained.append((folder.parts[-3], cfg.seed))
        return real(arch, folder, cfg, **kw)

    monkeypatch.setattr(confirm, "train", counted)
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", *FAST]) == 0
    assert trained == []
    again = pd.read_csv(run / "confirm.csv")
    pd.testing.assert_frame_equal(first, again)
    assert confirm.main([str(run), "--top", "1", "--seeds", "2", *FAST]) == 0
    assert trained == [(first.network[0], 1), ("mobilenet_v3_small", 1)]  # the new seeds only


def test_an_interrupt_keeps_the_finished_trainings_and_the_same_command_resumes(run,
                                                                                monkeypatch):
    real, calls, once = confirm.train, [], [True]

    def interrupted_second(arch, folder, cfg, **kw):
        calls.append(folder)
        if len(calls) == 2 and once and once.pop():
            raise KeyboardInterrupt
        return real(arch, folder, cfg, **kw)

    monkeypatch.setattr(confirm, "train", interrupted_second)
    with pytest.raises(KeyboardInterrupt):
        confirm.main([str(run), "--top", "1", "--seeds", "2", *FAST])
    table = pd.read_csv(run / "confirm.csv")  # written with what finished
    assert list(table.seeds) == [1, 0]
    calls.clear()
    assert confirm.main([str(run), "--top", "1", "--seeds", "2", *FAST]) == 0
    assert [c.parts[-1] for c in calls] == ["seed1", "seed0", "seed1"]  # not the first again
    assert list(pd.read_csv(run / "confirm.csv").seeds) == [2, 2]
    # stopped at the candidate's third seed: the baseline's finished seeds, later in the
    # order, are in the table all the same
    monkeypatch.setattr(confirm, "train", lambda *a, **kw: (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        confirm.main([str(run), "--top", "1", "--seeds", "3", *FAST])
    assert list(pd.read_csv(run / "confirm.csv").seeds) == [2, 2]


def test_seeds_trained_beyond_the_plan_are_in_the_table(run, monkeypatch):
    # the second candidate gets one seed; a second one trained by hand into its folder
    # (nas.train --runs-dir <recipe> --name seed1) counts, and nothing is trained again
    assert confirm.main([str(run), "--top", "2", "--seeds", "1", *FAST]) == 0
    second = pd.read_csv(run / "confirm.csv").network[1]
    seed0 = next((run / "confirm" / second).glob("*/seed0"))
    extra = json.loads((seed0 / "metrics.json").read_text())
    extra["test_accuracy"] = round(extra["test_accuracy"] + 0.1, 4)
    (seed0.parent / "seed1").mkdir()
    (seed0.parent / "seed1" / "metrics.json").write_text(json.dumps(extra))
    monkeypatch.setattr(confirm, "train", lambda *a, **kw: pytest.fail("trained again"))
    assert confirm.main([str(run), "--top", "2", "--seeds", "1", *FAST]) == 0
    row = pd.read_csv(run / "confirm.csv").set_index("network").loc[second]
    first = json.loads((seed0 / "metrics.json").read_text())["test_accuracy"]
    assert row.seeds == 2
    assert (row.test_accuracy_seed0, row.test_accuracy_seed1) == pytest.approx(
        (first, extra["test_accuracy"]))
    assert row.test_accuracy_mean == pytest.approx((first + extra["test_accuracy"]) / 2)


def test_a_failed_training_is_recorded_and_the_others_go_on(run, monkeypatch):
    real = confirm.train

    def fails_for_the_baseline(arch, folder, cfg, **kw):
        if "mobilenet_v3_small" in str(folder):
            raise CandidateFailed("non-finite training loss (nan) in epoch 1")
        return real(arch, folder, cfg, **kw)

    monkeypatch.setattr(confirm, "train", fails_for_the_baseline)
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", *FAST]) == 0
    df = pd.read_csv(run / "confirm.csv")
    assert df.seeds.tolist() == [1, 0]
    assert df.fail_reason[1] == "non-finite training loss (nan) in epoch 1"
    assert df.confirmed_best[0]


def test_match_latency_adds_width_scaled_baselines_nearest_each_candidate(run, capsys):
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", "--match-latency",
                         *FAST]) == 0
    df = pd.read_csv(run / "confirm.csv")
    matched = df[df.kind == "matched"]
    # the verdict at equal latency follows the table, from the same numbers
    out = capsys.readouterr().out
    assert out.rstrip().endswith(confirm.verdict(df).splitlines()[-1])
    assert f"    {matched.network.iloc[0]} (" in out and "1 seed" in out
    assert len(matched) == 1
    name = matched.network.iloc[0]
    family, mult = name.split("@")
    assert family == "mobilenet_v3_small" and 0.1 <= float(mult) <= 2.0
    assert round(float(mult) / 0.05, 6) == round(float(mult) / 0.05)
    assert matched.matched_to.iloc[0].startswith(df.network[0])
    assert matched.seeds.iloc[0] == 1


def test_a_resumed_confirmation_keeps_its_matches(run, monkeypatch):
    """Matching again would pick a neighbouring width as often as not (noise of a few percent)
    and train it: a second call keeps the widths it matched and trains nothing new."""
    argv = [str(run), "--top", "1", "--seeds", "1", "--match-latency", *FAST]
    assert confirm.main(argv) == 0
    first = pd.read_csv(run / "confirm.csv")
    kept = json.loads((run / "confirm" / confirm.MATCHES_FILE).read_text())
    assert list(kept) == ["mobilenet_v3_small"] and list(kept["mobilenet_v3_small"]) == [
        first.network[0]]
    trained = []
    monkeypatch.setattr(confirm, "train", lambda *a, **kw: trained.append(a) or {})
    monkeypatch.setattr(confirm, "match_width", lambda *a, **kw: pytest.fail("matched again"))
    assert confirm.main(argv) == 0
    assert trained == []
    again = pd.read_csv(run / "confirm.csv")
    assert list(again.network) == list(first.network)
    # a confirmation from before matches.json: its matches come from its confirm.csv
    (run / "confirm" / confirm.MATCHES_FILE).unlink()
    assert confirm.main(argv) == 0 and trained == []
    assert list(pd.read_csv(run / "confirm.csv").network) == list(first.network)
    (run / "confirm" / confirm.MATCHES_FILE).write_text("{not json")
    with pytest.raises(confirm.ConfirmError, match="matches.json: unreadable"):
        confirm.confirm(confirm.config_from_argv(argv))


@pytest.mark.parametrize("flags, fragment", [
    (["--top", "0"], "--top 0: must be >= 1"),
    (["--baselines", "mobilenet_v2@abc"], "--baselines"),
    (["--baselines", "no_such_net"], "--baselines"),
    (["--match-latency", "--no-latency"], "matches.json has no match of mobilenet_v3_small"),
    (["--lr", "nan"], "--lr nan"), (["--clip-grad", "-1"], "--clip-grad -1: must be a finite"),
    (["--latency-server", "http://127.0.0.1:9"], "--latency-server and --latency-token-file go"),
    (["--latency-server", "http://127.0.0.1:9", "--latency-token-file", "/no/token"],
     "/no/token"),
])
def test_bad_flags_are_one_line_and_write_nothing(run, capsys, flags, fragment):
    before = sorted(p.name for p in run.iterdir())
    assert confirm.main([str(run), *flags, *FAST]) == 2
    one_line_error(capsys, "nas.confirm", fragment)
    assert sorted(p.name for p in run.iterdir()) == before


def test_a_run_from_another_machine_is_refused_unless_no_latency(run, capsys, monkeypatch):
    monkeypatch.setattr("nas.latency.cpu_name", lambda: "Another CPU (family 1 model 2, avx2)")
    assert confirm.main([str(run), "--top", "1", *FAST]) == 2
    one_line_error(capsys, "nas.confirm", "--no-latency")
    assert not (run / "confirm").exists()
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", "--no-latency", *FAST]) == 0
    df = pd.read_csv(run / "confirm.csv")
    trials = pd.read_csv(run / "trials.csv").set_index("number")
    assert df.latency_ms[0] == pytest.approx(trials.latency_ms[int(df.trial[0])])  # the run's


def test_a_confirmation_carried_to_another_machine_trains_what_is_missing_at_kept_latencies(
        run, monkeypatch):
    """Matched and timed on the run's machine, trained on another (a session on another VM):
    --no-latency keeps the sitting's latencies and the matched widths, measures nothing."""
    argv = [str(run), "--top", "1", "--seeds", "1", "--match-latency", *FAST]
    assert confirm.main(argv) == 0
    first = pd.read_csv(run / "confirm.csv")
    matched = first[first.kind == "matched"].network.iloc[0]
    shutil.rmtree(run / "confirm" / confirm.training_name(matched))  # not trained yet there
    for ckpt in (run / "confirm").rglob("*.pt"):
        ckpt.unlink()  # carried without its checkpoints
    monkeypatch.setattr("nas.latency.cpu_name", lambda: "Another CPU (family 1 model 2, avx2)")
    monkeypatch.setattr(confirm, "match_width", lambda *a, **kw: pytest.fail("matched again"))
    monkeypatch.setattr(confirm, "RunLatency", lambda *a, **kw: pytest.fail("measured"))
    trained = []
    real_train = confirm.train
    monkeypatch.setattr(confirm, "train",
                        lambda arch, *a, **kw: trained.append(arch) or real_train(arch, *a, **kw))
    assert confirm.main([*argv, "--no-latency"]) == 0
    assert [a.to_str() for a in trained] == [load_architecture(matched).to_str()]
    again = pd.read_csv(run / "confirm.csv")
    assert list(again.network) == list(first.network)
    assert list(again.latency_ms) == pytest.approx(list(first.latency_ms))  # the kept sitting's
    assert list(again.seeds) == [1] * len(again)


def test_the_sitting_is_measured_on_the_study_s_yardstick(run, monkeypatch):
    """Against the reference latency the study kept, as the search and nas.plot --remeasure:
    a sitting calibrated anew put every network 26% above the search's numbers."""
    study, _ = load_run_study(run)
    study.set_user_attr(REFERENCE_ATTR, 7.25)
    seen = []
    real = confirm.RunLatency
    monkeypatch.setattr(confirm, "RunLatency",
                        lambda *a, **kw: seen.append(kw.get("reference_ms")) or real(*a, **kw))
    assert confirm.main([str(run), "--top", "1", "--seeds", "1", *FAST]) == 0
    assert seen == [7.25]


def test_a_run_without_a_complete_trial_is_one_line(tmp_path, capsys):
    run = tmp_path / "empty"
    run.mkdir()
    storage = f"sqlite:///{run / 'study.db'}"
    optuna.create_study(study_name="empty", storage=storage).ask()  # one RUNNING trial
    (run / "run.json").write_text(json.dumps({"study_name": "empty", "settings": {
        "target_ms": 5, "alpha": -0.07, "beta": -0.07, "input_size": 32, "device": "cpu",
        "threads": 1}}))
    assert confirm.main([str(run), *FAST]) == 2
    one_line_error(capsys, "nas.confirm", "no completed trial")
    assert not (run / "confirm").exists()


def test_latency_is_re_measured_on_a_latency_server(run, tmp_path, capsys):
    # a real server on the loopback address measures every network of the sitting; a run whose
    # latency device is not the server's is refused, naming the server
    from test_latency_server import TOKEN, start_server
    token = tmp_path / "token.txt"
    token.write_text(TOKEN + "\n")
    proc, url = start_server(token, 0)
    try:
        meta = json.loads((run / "run.json").read_text())
        device = meta["settings"]["latency_device"]
        meta["settings"]["latency_device"] = "Another CPU (family 1 model 2, avx2)"
        (run / "run.json").write_text(json.dumps(meta))
        flags = ["--latency-server", url, "--latency-token-file", str(token)]
        assert confirm.main([str(run), "--top", "1", "--seeds", "1", *flags, *FAST]) == 2
        one_line_error(capsys, "nas.confirm", f"the latency server {url} is")
        meta["settings"]["latency_device"] = device
        (run / "run.json").write_text(json.dumps(meta))
        assert confirm.main([str(run), "--top", "1", "--seeds", "1", *flags, *FAST]) == 0
    finally:
        proc.terminate()
        log = proc.communicate(timeout=30)
    df = pd.read_csv(run / "confirm.csv")
    measured = json.loads((run / "confirm" / "latency.json").read_text())["ms"]
    assert len(df) == 2 and len(measured) == 2 and all(v > 0 for v in measured.values())
    served = [line for line in "".join(log).splitlines() if "/measure" in line and " 200" in line]
    assert len(served) == 2, log


def test_the_training_order_puts_the_top_candidates_verdict_first():
    arch = load_architecture("mobilenet_v3_small")
    c1, c2 = confirm.Network("trial-3", "candidate", arch), confirm.Network("trial-7",
                                                                            "candidate", arch)
    base = confirm.Network("mobilenet_v2", "baseline", arch)
    m1 = confirm.Network("mobilenet_v2@0.5", "matched", arch,
                         matched_to="trial-3 (+1.0%), trial-7 (-2.0%)")
    m2 = confirm.Network("mobilenet_v2@0.75", "matched", arch, matched_to="trial-7 (+0.5%)")
    order = [(n.name, s) for n, s in
             confirm.training_order([c1, c2, base, m1, m2], [c1, c2], seeds=2)]
    assert order == [("trial-3", 0), ("mobilenet_v2@0.5", 0), ("trial-3", 1),
                     ("mobilenet_v2@0.5", 1),
                     ("trial-7", 0), ("mobilenet_v2@0.75", 0), ("mobilenet_v2@0.75", 1),
                     ("mobilenet_v2", 0), ("mobilenet_v2", 1)]
    # the family with the best proxy accuracy trains first in a candidate's group
    v3 = confirm.Network("mobilenet_v3_small", "baseline", arch, proxy_accuracy=0.36)
    base.proxy_accuracy = 0.24
    m3 = confirm.Network("mobilenet_v3_small@1.1", "matched", arch, matched_to="trial-3 (+2.0%)")
    order = [(n.name, s) for n, s in
             confirm.training_order([c1, base, v3, m1, m3], [c1], seeds=1)]
    assert order == [("trial-3", 0), ("mobilenet_v3_small@1.1", 0), ("mobilenet_v2@0.5", 0),
                     ("mobilenet_v2", 0), ("mobilenet_v3_small", 0)]


def test_a_baseline_matched_at_width_1_shares_the_baselines_training(tmp_path):
    from nas.train import TrainConfig
    arch = load_architecture("mobilenet_v3_small")
    cfg = TrainConfig(epochs=20, seed=1)
    folder = confirm.train_folder(tmp_path, confirm.Network("mobilenet_v3_small", "baseline",
                                                            arch), cfg)
    assert confirm.train_folder(tmp_path, confirm.Network("mobilenet_v3_small@1", "matched",
                                                          arch), cfg) == folder
    assert confirm.train_folder(tmp_path, confirm.Network("mobilenet_v3_small@1.05", "matched",
                                                          arch), cfg) != folder
    assert folder.parts[-1] == "seed1" and folder.parts[-3] == "mobilenet_v3_small"


def test_a_clipped_recipe_trains_into_its_own_folder_and_unclipped_ones_keep_theirs(tmp_path):
    from nas.train import TrainConfig
    net = confirm.Network("mobilenet_v3_small", "baseline", load_architecture("mobilenet_v3_small"))
    assert confirm.config_from_argv([str(tmp_path)]).clip_grad == 1.0  # clipped by default
    assert confirm.config_from_argv([str(tmp_path), "--clip-grad", "0"]).clip_grad is None
    plain = confirm.train_folder(tmp_path, net, TrainConfig(epochs=20, final_map=1,
                                                            clip_grad=None))
    assert plain.parts[-2] == "e20-b128-lr0.1-fm1"  # the folders trained before --clip-grad
    clipped = confirm.train_folder(tmp_path, net, TrainConfig(epochs=20, final_map=1,
                                                              clip_grad=1.0))
    assert clipped.parts[-2] == "e20-b128-lr0.1-fm1-clip1"


def test_a_baseline_enqueued_as_a_trial_is_confirmed_as_a_baseline_not_a_candidate():
    """An outcome run at mobilenet_v3_large's latency had the enqueued baseline as its best
    trial: confirming it as a candidate compared the baseline with itself."""
    study = optuna.create_study(direction="maximize")
    arch = load_architecture("mobilenet_v3_small").to_dict()
    for reward, enqueued in [(0.40, "mobilenet_v3_small"), (0.35, None), (0.38, None),
                             (0.30, None)]:
        attrs = {"arch_dict": json.dumps(arch), "accuracy": reward, "latency_ms": 2.0,
                 "reward": reward, **({"enqueued_baseline": enqueued} if enqueued else {})}
        study.add_trial(optuna.trial.create_trial(value=reward, user_attrs=attrs))
    picked = confirm.candidates(study, {"target_ms": 2.0}, top=2)
    assert [n.name for n in picked] == ["trial-2", "trial-1"]
    assert all(n.kind == "candidate" for n in picked)
    only = optuna.create_study(direction="maximize")
    only.add_trial(study.trials[0])
    with pytest.raises(confirm.ConfirmError, match=r"no completed trial yet \(enqueued"):
        confirm.candidates(only, {"target_ms": 2.0}, top=1)


def test_the_verdict_sets_each_candidate_against_the_baselines_matched_to_it():
    from scipy.stats import ttest_ind

    rows = [dict(network="trial-3", kind="candidate", latency_ms=5.0, matched_to=None,
                 test_accuracy_seed0=0.80, test_accuracy_seed1=0.82),
            dict(network="trial-7", kind="candidate", latency_ms=6.0, matched_to=None,
                 test_accuracy_seed0=0.70),  # nothing matched to it: not in the verdict
            dict(network="mobilenet_v2@0.9", kind="matched", latency_ms=5.2,
                 matched_to="trial-3 (+4.0%)", test_accuracy_seed0=0.78,
                 test_accuracy_seed1=0.79),
            dict(network="mnasnet_a1@1.1", kind="matched", latency_ms=4.9,
                 matched_to="trial-9 (+1.0%), trial-3 (-2.0%)", test_accuracy_seed0=0.85),
            dict(network="mobilenet_v3_large@0.8", kind="matched", latency_ms=5.0,
                 matched_to="trial-3 (+0.0%)", test_accuracy_seed0=math.nan)]  # failed
    df = pd.DataFrame(rows)
    seeds = df.filter(like="test_accuracy_seed")
    df["seeds"] = seeds.notna().sum(axis=1)
    df["test_accuracy_mean"] = seeds.mean(axis=1)
    df["test_accuracy_sd"] = seeds.std(axis=1)
    lines = confirm.verdict(df).splitlines()
    assert lines[1] == ("  trial-3 (5.00 ms; 81.00% +- 1.41%, 2 seeds): above 1 of the 2 matched "
                        "to it")
    p = ttest_ind([0.80, 0.82], [0.78, 0.79], equal_var=False).pvalue
    assert lines[2] == ("    mobilenet_v2@0.9 (5.20 ms, +4.0%; 78.50% +- 0.71%, 2 seeds): "
                        f"trial-3 +2.50 points, Welch's t-test p = {p:.2f}")
    assert lines[3] == "    mnasnet_a1@1.1 (4.90 ms, -2.0%; 85.00%, 1 seed): trial-3 -4.00 points"
    assert lines[4].startswith("A side with one seed has no spread")
    assert len(lines) == 5 and "trial-7" not in "\n".join(lines)
    # two seeds on every side: no note; no trained matched pair: no verdict
    assert "one seed" not in confirm.verdict(df.drop(index=3))
    assert confirm.verdict(df[df.kind == "candidate"]) is None


def test_the_figure_places_close_networks_labels_apart():
    # a candidate and the baseline matched to its latency sit close: their labels must not
    # be printed one over the other, across the traces of different kinds
    df = pd.DataFrame({
        "network": ["trial-2", "mobilenet_v2@0.9", "mobilenet_v3_small"],
        "kind": ["candidate", "matched", "baseline"], "seeds": [1, 1, 1], "epochs": [1, 1, 1],
        "latency_ms": [4.86, 4.80, 1.46], "test_accuracy_mean": [0.451, 0.452, 0.30],
        "test_accuracy_sd": [math.nan] * 3, "proxy_accuracy": [0.30, 0.45, 0.38]})
    fig = confirm.figure(df, target_ms=8.0, runtime="onnxruntime")
    left = {t.name: list(t.textposition) for t in fig.data if t.xaxis == "x"}
    assert left["matched"] == ["middle right"] and left["candidate"] != ["middle right"]
    assert left["baseline"] == ["middle right"]
    right = [p for t in fig.data if t.xaxis == "x2" for p in t.textposition]
    assert right == ["middle right"] * 3  # apart on the proxy axis: nothing moves
