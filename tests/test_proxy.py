"""Proxy training: valid BN statistics, NaN handling, reproducibility, pruning hooks."""

import dataclasses
import threading

import optuna
import pytest
import torch

from nas.arch import Architecture, BlockSpec, Settings, Stem, load_architecture
from nas.data import DataSplits, ImageDataset
from nas.proxy import CandidateFailed, ProxyBudget, proxy_arch, proxy_train, top1_accuracy


def synthetic_splits(n_train=256, n_val=96, classes=4, size=16, seed=0) -> DataSplits:
    """Learnable images: each class is a distinct colour plus noise."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30],
                            [30, 220, 220], [220, 30, 220]], dtype=torch.float32)[:classes]

    def make(n, random_labels=False):
        labels = torch.arange(n) % classes
        if random_labels:  # a test split no classifier can learn: scoring on it gives chance
            labels = torch.randint(0, classes, (n,), generator=g)
        base = palette[labels][:, :, None, None].expand(n, 3, size, size)
        noise = torch.randn(n, 3, size, size, generator=g) * 40
        images = (base + noise).clamp(0, 255).to(torch.uint8).contiguous()
        return ImageDataset(images, labels.to(torch.int64))

    return DataSplits(train=make(n_train), val=make(n_val), test=make(n_val, random_labels=True),
                      classes=tuple(f"c{i}" for i in range(classes)), source="synthetic")


# Small but real: stem stride 2, an MBConv stage with SE, and a slow-BN setting like MnasNet-B1.
SLOW_BN = Architecture(
    blocks=(BlockSpec("sepconv", 3, 8), BlockSpec("mbconv", 3, 16, stride=2, expansion=3,
                                                  se_ratio=0.25, repeats=2),
            BlockSpec("mbconv", 5, 24, stride=2, expansion=3)),
    stem=Stem(filters=8), settings=Settings(bn_momentum=0.0003))
FAST = ProxyBudget(train_images=256, epochs=2, batch_size=32, optimizer="adamw", lr=5e-3,
                   weight_decay=0.05, val_images=96,
                   final_map=2, bn_recalibrate=4)


def test_proxy_arch_adapts_strides_and_bn_momentum():
    arch = load_architecture("mnasnet_b1")
    trained = proxy_arch(arch, ProxyBudget(final_map=4), 32)
    assert trained.total_stride == 8
    assert trained.settings.bn_momentum == 0.1
    assert [b.filters for b in trained.blocks] == [b.filters for b in arch.blocks]
    assert proxy_arch(arch, ProxyBudget(final_map=2), 32).total_stride == 16
    deployed = proxy_arch(arch, ProxyBudget(final_map=1), 32)  # 32 / 32 = 1: nothing to adapt
    assert deployed.total_stride == 32 and deployed.to_str() == arch.to_str()
    assert deployed.stem == arch.stem


def test_bn_statistics_are_valid_when_scoring():
    data = synthetic_splits()
    fixed = proxy_train(SLOW_BN, data, FAST)
    assert fixed.accuracy > 0.9  # the task is easy; eval-mode BN must not spoil it
    # The failure it guards against: the architecture's own slow momentum and no recalibration
    # leave running statistics at their initial values, and eval mode scores near chance.
    broken = dataclasses.replace(FAST, bn_momentum=1e-4, bn_recalibrate=0, ghost_batches=1)
    assert proxy_train(SLOW_BN, data, broken).accuracy < fixed.accuracy - 0.3


def test_reproducible_under_a_seed():
    data = synthetic_splits()
    a = proxy_train(SLOW_BN, data, FAST, seed=3)
    b = proxy_train(SLOW_BN, data, FAST, seed=3)
    c = proxy_train(SLOW_BN, data, FAST, seed=4)
    assert a.epoch_losses == b.epoch_losses and a.accuracy == b.accuracy
    assert a.epoch_losses != c.epoch_losses


def test_non_finite_loss_fails_the_candidate():
    with pytest.raises(CandidateFailed, match="non-finite"):
        proxy_train(SLOW_BN, synthetic_splits(), dataclasses.replace(FAST, lr=1e6))


def test_reports_intermediate_accuracy_and_can_be_pruned():
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    study = optuna.create_study(direction="maximize", pruner=AlwaysPrune())
    trial = study.ask()
    with pytest.raises(optuna.TrialPruned):
        proxy_train(SLOW_BN, synthetic_splits(), FAST, trial=trial)
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [1]

    keep = optuna.create_study(direction="maximize")
    t = keep.ask()
    result = proxy_train(SLOW_BN, synthetic_splits(), FAST, trial=t)
    values = keep._storage.get_trial(t._trial_id).intermediate_values
    assert values[1] == result.val_curve[0]
    assert len(result.val_curve) == FAST.epochs


def test_uses_the_budget_and_scores_on_validation():
    data = synthetic_splits(n_train=256, n_val=96)
    r = proxy_train(SLOW_BN, data, dataclasses.replace(FAST, train_images=128, epochs=1))
    assert len(r.epoch_losses) == 1
    assert r.images_per_second * r.train_seconds == pytest.approx(128)  # 4 steps of 32
    assert r.accuracy > 0.9  # scored on the learnable validation split, not on test
    assert r.trained_arch == proxy_arch(SLOW_BN, FAST, 16).to_str()
    # Accuracy is a fraction of the 96 validation images.
    assert round(r.accuracy * 96) == pytest.approx(r.accuracy * 96, abs=1e-9)


def test_the_sgd_proxy_trains_with_nas_trains_optimizer(monkeypatch):
    import nas.proxy

    made = []
    real = nas.proxy.make_optimizer

    def spy(model, budget, total_steps):
        optimizer, scheduler = real(model, budget, total_steps)
        made.append(optimizer)
        return optimizer, scheduler

    monkeypatch.setattr(nas.proxy, "make_optimizer", spy)
    data = synthetic_splits()
    sgd = dataclasses.replace(FAST, optimizer="sgd", lr=0.05, weight_decay=5e-4)
    r = proxy_train(SLOW_BN, data, sgd)
    opt = made[-1]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]  # none on BN, biases
    assert r.accuracy > 0.9  # it learns the learnable split
    adamw = proxy_train(SLOW_BN, data, FAST)
    assert isinstance(made[-1], torch.optim.AdamW)
    assert adamw.epoch_losses != r.epoch_losses


@pytest.mark.parametrize("field, value", [("epochs", 0), ("batch_size", 0), ("lr", 0.0),
                                          ("warmup", 1.0), ("report_every", 0),
                                          ("bn_recalibrate", -1), ("optimizer", "rmsprop"),
                                          ("weight_decay", -0.1), ("clip_grad", 0.0),
                                          ("clip_grad", -1.0), ("clip_grad", float("nan"))])
def test_bad_budget_is_a_clear_error(field, value):
    with pytest.raises(ValueError, match=field):
        proxy_train(SLOW_BN, synthetic_splits(), dataclasses.replace(FAST, **{field: value}))


def test_a_batch_larger_than_the_training_split_is_a_clear_error():
    data = synthetic_splits(n_train=16)
    with pytest.raises(ValueError, match="batch_size=32 must be <= the 16 training images"):
        proxy_train(SLOW_BN, data, FAST)


def test_reporting_to_a_trial_does_not_change_what_is_trained():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.NopPruner())
    reported = proxy_train(SLOW_BN, synthetic_splits(), FAST, trial=study.ask())
    alone = proxy_train(SLOW_BN, synthetic_splits(), FAST)
    assert len(reported.val_curve) == 2 and len(alone.val_curve) == 1
    assert reported.epoch_losses == alone.epoch_losses
    assert reported.accuracy == alone.accuracy


def test_diverged_weights_fail_when_scored_instead_of_counting_as_class_0():
    class Diverged(torch.nn.Module):
        def forward(self, x):
            return torch.full((len(x), 4), float("nan"))

    data = synthetic_splits()
    with pytest.raises(CandidateFailed, match="non-finite network outputs"):
        top1_accuracy(Diverged(), data.val, mean=data.mean, std=data.std)


def test_threads_are_asked_before_each_step_used_by_it_and_restored(monkeypatch):
    # search processes sharing one machine share its cores as they come and go (nas.search)
    import nas.proxy

    answers = [1] * 5 + [2] * 3 + [3] * 16  # 3 epochs of 8 steps
    asked, seen, real = iter(answers), [], nas.proxy.train_step

    def step(*a, **kw):
        seen.append(torch.get_num_threads())
        return real(*a, **kw)

    monkeypatch.setattr(nas.proxy, "train_step", step)
    before = torch.get_num_threads()
    result = proxy_train(SLOW_BN, synthetic_splits(), dataclasses.replace(FAST, epochs=3),
                         threads=lambda: next(asked))
    assert seen == answers and result.threads == (1, 2, 3)  # one entry per change
    assert torch.get_num_threads() == before
    assert proxy_train(SLOW_BN, synthetic_splits(), FAST).threads == ()  # not asked: as set


GHOST = dataclasses.replace(FAST, ghost_batches=2)  # the default's, in small


def test_ghost_batches_train_identically_on_one_thread_and_two_at_once(monkeypatch):
    # the parts of a batch run at once when the CPU share has the cores, one after the other
    # when it does not; the weights must not depend on which (the share changes as other
    # searches come and go), nor on the order the parts' gradients and dropout draws land in
    import nas.proxy

    seen, real = [], nas.proxy.SeededDropout.forward

    def forward(self, x):
        if getattr(nas.proxy._local, "dropout", None) is not None:  # a part of a training step
            seen.append((threading.current_thread().name, torch.get_num_threads()))
        return real(self, x)

    monkeypatch.setattr(nas.proxy.SeededDropout, "forward", forward)
    one = proxy_train(SLOW_BN, synthetic_splits(), GHOST, threads=lambda: 1)
    one_ran = set(seen)
    seen.clear()
    two = proxy_train(SLOW_BN, synthetic_splits(), GHOST, threads=lambda: 2)
    assert one.epoch_losses == two.epoch_losses and one.accuracy == two.accuracy
    assert len(one_ran) == 1 and {n for _, n in one_ran} == {1}  # each part on one thread,
    assert len(set(seen)) == 2 and {n for _, n in seen} == {1}  # two parts at once on 2 cores
    assert len(seen) == FAST.epochs * (FAST.train_images // FAST.batch_size) * 2  # 2 parts a step
    again = proxy_train(SLOW_BN, synthetic_splits(), GHOST, threads=lambda: 2)
    assert again.epoch_losses == two.epoch_losses  # dropout draws too: per part, seeded
    whole = dataclasses.replace(GHOST, ghost_batches=1)
    assert proxy_train(SLOW_BN, synthetic_splits(), whole).epoch_losses != one.epoch_losses


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("threads", [1, 2])
def test_a_ghost_step_is_the_mean_of_its_parts_each_normalised_alone(threads):
    from nas.proxy import train_step, training_model

    torch.manual_seed(0)
    model = training_model(proxy_arch(SLOW_BN, FAST, 16), 4).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.arange(8) % 4
    loss_fn = torch.nn.CrossEntropyLoss()
    expected = sum(loss_fn(model(x[i:i + 4]), y[i:i + 4]) / 2 for i in (0, 4))
    expected.backward()
    want = _grads(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss = train_step(model, x, y, loss_fn, optimizer, False, "cpu", parts=2,
                          gen=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(before)
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    for got, w in zip(_grads(model), want, strict=True):
        torch.testing.assert_close(got, w, rtol=1e-4, atol=1e-6)
    model.zero_grad()
    whole = loss_fn(model(x), y)  # one batch of 8: other BN statistics, another gradient
    whole.backward()
    assert not all(torch.allclose(g, w, rtol=1e-3) for g, w in zip(_grads(model), want,
                                                                      strict=True))


@pytest.mark.parametrize("change, message", [
    ({"batch_size": 30, "ghost_batches": 4}, "batch_size=30 must be a multiple of ghost_batches=4"),
    ({"ghost_batches": 0}, "ghost_batches=0 must be >= 1"),
    ({"ghost_batches": 2, "bn_recalibrate": 0}, "ghost_batches=2 needs bn_recalibrate >= 1"),
    ({"batch_size": 2, "ghost_batches": 2}, "at least 2 images a part"),
])
def test_bad_ghost_batches_are_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        proxy_train(SLOW_BN, synthetic_splits(), dataclasses.replace(FAST, **change))


def test_three_parts_train_identically_whichever_finishes_first():
    # three gradients added in the order the parts finished would differ in their last bits
    three = dataclasses.replace(FAST, batch_size=30, ghost_batches=3)
    runs = [proxy_train(SLOW_BN, synthetic_splits(), three, threads=lambda n=n: n)
            for n in (1, 3, 3)]
    assert runs[0].epoch_losses == runs[1].epoch_losses == runs[2].epoch_losses
    assert runs[0].accuracy == runs[1].accuracy == runs[2].accuracy


def test_a_failing_part_returns_only_once_the_others_have_stopped():
    # else the next candidate's latency would be measured while an orphan part still trains
    import time

    from nas.proxy import _run_parts

    finished = []

    def part(i):
        if i == 0:
            raise RuntimeError("part 0 failed")
        time.sleep(0.3)
        finished.append(i)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(RuntimeError, match="part 0 failed"):
            _run_parts(part, [(0,), (1,)], cpu=True)
    finally:
        torch.set_num_threads(before)
    assert finished == [1]


def test_part_threads_never_take_the_stop_signals():
    # nas.search holds SIGINT/SIGTERM back while it spawns workers; a thread that could take
    # them would let Ctrl-C land mid-spawn
    import signal

    from nas.proxy import _part_pool

    blocked = _part_pool(2).submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    assert {signal.SIGINT, signal.SIGTERM} <= blocked


@pytest.mark.parametrize("parts", [1, 2])
def test_clip_grad_bounds_the_whole_batch_step(parts):
    """Plain SGD moves the weights by lr x gradient: clipped, by exactly lr x the norm asked;
    unclipped, by lr x the (much larger) gradient norm. With ghost batches, the summed gradient
    is clipped, not each part."""
    from nas.proxy import train_step, training_model

    def step_norm(clip):
        torch.manual_seed(0)
        model = training_model(proxy_arch(SLOW_BN, FAST, 16), 4).train()
        before = [p.detach().clone() for p in model.parameters()]
        x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
        y = torch.arange(8) % 4
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        train_step(model, x, y, torch.nn.CrossEntropyLoss(), optimizer, False, "cpu",
                   parts=parts, gen=torch.Generator().manual_seed(0), clip_grad=clip)
        return torch.cat([(p.detach() - b).flatten()
                          for p, b in zip(model.parameters(), before, strict=True)]).norm().item()

    unclipped = step_norm(None)
    assert unclipped > 0.1 * 0.05  # the gradient norm is well above the clip asked below
    assert step_norm(0.05) == pytest.approx(0.1 * 0.05, rel=1e-3)
    assert step_norm(1e6) == pytest.approx(unclipped, rel=1e-5)  # a loose bound changes nothing


def test_the_budget_clip_reaches_every_step(monkeypatch):
    import nas.proxy

    seen, real = [], nas.proxy.train_step

    def step(*a, **k):
        seen.append(k["clip_grad"])
        return real(*a, **k)

    monkeypatch.setattr(nas.proxy, "train_step", step)
    proxy_train(SLOW_BN, synthetic_splits(), dataclasses.replace(FAST, clip_grad=2.5))
    assert seen and set(seen) == {2.5}
