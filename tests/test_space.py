"""The search space: sampling, the inverse map for enqueued networks, its size, strict loading."""

import copy
import dataclasses
import itertools
import json
import re
import subprocess
import sys

import optuna
import pytest
import torch
import torchvision
import yaml

from nas.arch import ArchError, Architecture, BlockSpec, load_architecture
from nas.blocks import layer_configs
from nas.model import build_model
from nas.space import (
    DEFAULT_SPACE,
    FACTORS,
    SPACES_DIR,
    SearchSpace,
    SpaceError,
    load_space,
    param_name,
    space_names,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# MobileNetV2's backbone (Sandler et al., 2018, Table 2), which MnasNet's space is laid over.
MBV2_FILTERS = [16, 24, 32, 64, 96, 160, 320]
MBV2_REPEATS = [1, 2, 3, 4, 3, 3, 1]
MBV2_STRIDES = [1, 2, 2, 2, 1, 2, 1]


@pytest.fixture(scope="module")
def mnasnet() -> SearchSpace:
    return load_space("mnasnet")


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return load_space("tiny")


def _sample(space: SearchSpace, sampler: optuna.samplers.BaseSampler, n: int) -> list[str]:
    study = optuna.create_study(sampler=sampler)
    return [space.sample(study.ask()).to_str() for _ in range(n)]


def test_shipped_spaces_load_by_name_and_path():
    assert {"mnasnet", "tiny"} <= set(space_names())
    assert DEFAULT_SPACE == "mnasnet"
    assert load_space("mnasnet") == load_space(SPACES_DIR / "mnasnet.yaml")
    with pytest.raises(SpaceError, match="not a shipped space; shipped: .*mnasnet"):
        load_space("no_such_space")


def test_mnasnet_space_is_the_papers(mnasnet):
    assert [b.filters for b in mnasnet.blocks] == MBV2_FILTERS
    assert [b.repeats for b in mnasnet.blocks] == MBV2_REPEATS
    assert [b.stride for b in mnasnet.blocks] == MBV2_STRIDES
    for b in mnasnet.blocks:
        assert b.op == ("conv", "sepconv", "mbconv")
        assert (b.kernel, b.expansion, b.se_ratio) == ((3, 5), (3, 6), (0, 0.25))
        assert b.skip == ("identity", "none")
        assert b.filters_mult == (0.75, 1.0, 1.25)
        # No delta may remove a block's only layer: blocks of 1 repeat search +0 and +1.
        assert b.repeats_delta == ((0, 1) if b.repeats == 1 else (-1, 0, 1))
    assert (mnasnet.stem.filters, mnasnet.stem.kernel, mnasnet.stem.stride) == (32, 3, 2)
    assert (mnasnet.head.filters, mnasnet.head.dropout) == (1280, 0.2)
    assert (mnasnet.settings.se_from, mnasnet.settings.se_gate) == ("input", "sigmoid")


def test_sampling_is_deterministic_under_a_seed(mnasnet):
    first = _sample(mnasnet, optuna.samplers.RandomSampler(seed=0), 10)
    assert first == _sample(mnasnet, optuna.samplers.RandomSampler(seed=0), 10)
    assert first != _sample(mnasnet, optuna.samplers.RandomSampler(seed=1), 10)


def test_tpe_sampling_is_deterministic_under_a_seed(tiny):
    def run(seed: int) -> list[str]:
        study = optuna.create_study(
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=3))
        archs: list[str] = []

        def objective(trial):
            arch = tiny.sample(trial)
            archs.append(arch.to_str())
            return sum(b.filters * b.repeats for b in arch.blocks)

        study.optimize(objective, n_trials=8)
        return archs

    assert run(0) == run(0)
    assert run(0) != run(1)


def test_samples_respect_the_space(mnasnet):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen_ops, seen_skips = set(), set()
    for _ in range(60):
        trial = study.ask()
        arch = mnasnet.sample(trial)
        arch.validate()
        assert len(arch.blocks) == 7
        assert [b.stride for b in arch.blocks] == MBV2_STRIDES
        assert arch.stem == mnasnet.stem and arch.head == mnasnet.head
        for i, (spec, choices) in enumerate(zip(arch.blocks, mnasnet.blocks, strict=True)):
            seen_ops.add(spec.op)
            assert spec.filters in choices.widths()
            assert spec.repeats - choices.repeats in choices.repeats_delta
            # Expansion is conditional: a parameter only in trials that chose MBConv.
            assert (f"b{i}_expansion" in trial.params) == (spec.op == "mbconv")
            if spec.op != "mbconv":
                assert spec.expansion == 1
            # Skip too: asked only where some layer can take a shortcut.
            cin = arch.blocks[i - 1].filters if i else arch.stem.filters
            can = spec.repeats > 1 or (spec.stride == 1 and cin == spec.filters)
            assert (f"b{i}_skip" in trial.params) == can
            seen_skips.add((i, can))
        expected = {param_name(i, f) for i in range(7) for f in FACTORS
                    if f not in ("expansion", "skip", "act")}  # act is fixed in this space
        assert expected <= set(trial.params)
    assert {(0, False), (0, True)} <= seen_skips  # block 0 (1 or 2 repeats) both ways
    assert seen_ops == {"conv", "sepconv", "mbconv"}


def test_fixed_factors_are_not_parameters(tiny):
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    tiny.sample(trial)
    # Block 0 fixes kernel; block 2 fixes op (mbconv), so its expansion is always searched.
    assert "b0_kernel" not in trial.params and "b2_op" not in trial.params
    assert "b2_expansion" in trial.params
    assert not any(k.startswith("b0_expansion") for k in trial.params)


@pytest.mark.parametrize("name", ["mnasnet", "mobilenet_v3", "mobilenet_v3_large", "tiny"])
def test_params_of_round_trips_through_enqueue(name):
    space = load_space(name)
    source = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=7))
    target = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=99))
    for _ in range(25):
        arch = space.sample(source.ask())
        params = space.params_of(arch)
        target.enqueue_trial(params)
        assert space.sample(target.ask()) == arch
        assert space.sample(optuna.trial.FixedTrial(params)) == arch


def test_params_of_names_the_width_when_multipliers_collide(mnasnet):
    # 16 x 0.75 rounds back to 16: both 0.75 and 1.0 give it, and the parameter is the width.
    assert mnasnet.blocks[0].widths() == [16, 24]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    arch = mnasnet.sample(study.ask())
    blocks = list(arch.blocks)
    blocks[0] = BlockSpec.from_str("sep_k3_s1_r1_c16_noskip")
    params = mnasnet.params_of(Architecture(blocks=tuple(blocks), stem=arch.stem, head=arch.head,
                                            settings=arch.settings))
    assert params["b0_filters"] == 16
    assert params["b0_op"] == "sepconv" and "b0_expansion" not in params


def test_sampling_asks_each_width_once_so_random_sampling_draws_widths_evenly(mnasnet, tiny):
    # Blocks 0 and 1 list 0.75, 1.0, 1.25, but 0.75 rounds back to the base width (16, 24): asked
    # as three multipliers, random sampling drew the base width 2/3 of the time.
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    widths = {0: [], 1: [], 2: []}
    for _ in range(600):
        trial = study.ask()
        arch = mnasnet.sample(trial)
        for i in widths:
            widths[i].append(arch.blocks[i].filters)
        assert trial.distributions["b0_filters"].choices == (16, 24)
        assert trial.distributions["b1_filters"].choices == (24, 32)
        assert trial.distributions["b2_filters"].choices == (24, 32, 40)
        assert "b0_filters_mult" not in trial.params
        study.tell(trial, 0.0)
    for i, expected in [(0, {16: 1 / 2, 24: 1 / 2}), (1, {24: 1 / 2, 32: 1 / 2}),
                        (2, {24: 1 / 3, 32: 1 / 3, 40: 1 / 3})]:
        counts = {w: widths[i].count(w) / 600 for w in set(widths[i])}
        assert counts.keys() == expected.keys()
        for w, share in expected.items():
            assert counts[w] == pytest.approx(share, abs=0.07), (i, counts)
    # tiny's block 2 lists 0.75, 1.0 and 1.25 for base 16: widths 16, 16 and 24
    assert tiny.blocks[2].options("filters_mult") == (16, 24)
    assert tiny.blocks[2].choices("filters_mult") == (0.75, 1.0, 1.25)  # the file, unchanged


def test_a_multiplier_list_with_one_distinct_width_is_not_a_parameter(tiny):
    block = dataclasses.replace(tiny.blocks[1], filters_mult=(1.0, 1.05))  # 16.8 rounds to 16
    assert block.widths() == [16]
    assert block.options("filters_mult") == (16,)
    assert "filters_mult" not in block.searched()
    space = dataclasses.replace(tiny, blocks=(tiny.blocks[0], block, tiny.blocks[2]))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    arch = space.sample(trial)
    assert "b1_filters" not in trial.params
    assert arch.blocks[1].filters == 16
    assert "b1_filters" not in space.params_of(arch)


@pytest.mark.parametrize("name, fragment", [
    ("mnasnet_a1", "blocks[4]: filters=112 is not reachable; allowed: [72, 96, 120]"),
    ("mobilenet_v2", "stem.act='relu6' but the space fixes stem.act='relu'"),
    ("mobilenet_v3_small", "stem.filters=16 but the space fixes stem.filters=32"),
])
def test_params_of_rejects_networks_outside_the_space(mnasnet, name, fragment):
    with pytest.raises(SpaceError) as err:
        mnasnet.params_of(load_architecture(name))
    assert fragment in str(err.value)
    assert name in str(err.value)


def test_params_of_rejects_wrong_depth_and_choices(tiny):
    arch = tiny.sample(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    with pytest.raises(SpaceError, match="has 2 blocks; space tiny has 3"):
        tiny.params_of(Architecture(blocks=arch.blocks[:2], stem=arch.stem, head=arch.head))
    bad = list(arch.blocks)
    bad[0] = BlockSpec.from_str("conv_k5_s1_r1_c8")
    with pytest.raises(SpaceError, match=r"blocks\[0\]: kernel=5 is not a choice; allowed: \[3\]"):
        tiny.params_of(Architecture(blocks=tuple(bad), stem=arch.stem, head=arch.head))
    bad[0] = BlockSpec.from_str("conv_k3_s2_r1_c8")
    with pytest.raises(SpaceError, match="stride=2 but the space fixes stride=1"):
        tiny.params_of(Architecture(blocks=tuple(bad), stem=arch.stem, head=arch.head))


def _brute_force_block_count(space: SearchSpace, i: int) -> int:
    """Distinct block specs over every combination of the block's own choices."""
    block = space.blocks[i]
    specs = set()
    for op, kernel, se, skip, delta, mult in itertools.product(
            block.op, block.kernel, block.se_ratio, block.skip, block.repeats_delta,
            block.filters_mult):
        for expansion in (block.expansion if op == "mbconv" else (1,)):
            specs.add(block.spec(op=op, kernel=kernel, expansion=expansion, se_ratio=se, skip=skip,
                                 repeats_delta=delta, filters=block.width(mult)).to_str())
    return len(specs)


def test_size_equals_brute_force_over_whole_tiny_space(tiny):
    """Every parameter combination through FixedTrial, counting distinct architectures."""
    names, grids = [], []
    for i, block in enumerate(tiny.blocks):
        for factor in block.searched():
            if factor != "expansion":
                names.append(param_name(i, factor))
                grids.append(block.options(factor))  # what sample asks
    archs, asked = set(), set()
    for values in itertools.product(*grids):
        params = dict(zip(names, values, strict=True))
        # The conditional expansion is asked only for mbconv blocks: enumerate it for those.
        cond = [(f"b{i}_expansion", b.expansion) for i, b in enumerate(tiny.blocks)
                if len(b.expansion) > 1 and params.get(f"b{i}_op", b.op[0]) == "mbconv"]
        for exp_values in itertools.product(*(v for _, v in cond)):
            full = params | dict(zip((n for n, _ in cond), exp_values, strict=True))
            trial = optuna.trial.FixedTrial(full)
            archs.add(tiny.sample(trial))
            asked.add(tuple(sorted(trial.params.items())))
    # every sampled architecture is another network; skip where no layer can take a
    # shortcut would have named 384 of them twice (1,536 before)
    networks = {tuple(dataclasses.astuple(c)[:-1] for c in layer_configs(a)) for a in archs}
    assert tiny.size() == len(archs) == len(networks) == 1152
    # and no two sets of asked parameters name one network (0.75 and 1.0 both gave width 16)
    assert len(asked) == 1152


def test_mnasnet_size_counts_skip_only_where_a_shortcut_can_be(mnasnet):
    counts = [_brute_force_block_count(mnasnet, i) for i in range(7)]
    # 4 op variants (conv, sepconv, mbconv x 2 expansions) x 2 kernels x 2 SE x 2 skips = 32,
    # times repeats (2 or 3) times distinct widths (2 where 0.75 rounds back, else 3).
    assert counts == [128, 192, 288, 288, 288, 288, 192]
    # Every (width, repeats) path through the 7 blocks: a block's skip doubles the count only
    # if it has 2+ layers or keeps stride 1 and the width it is given.
    total = 0
    grids = [list(itertools.product(b.widths(), b.repeats_delta)) for b in mnasnet.blocks]
    for path in itertools.product(*grids):
        n, cin = 1, mnasnet.stem.filters
        for b, (width, delta) in zip(mnasnet.blocks, path, strict=True):
            layers = b.repeats + delta
            shortcut = layers > 1 or (b.stride == 1 and cin == width)
            n *= counts_without_skip(b) * (len(b.skip) if shortcut else 1)
            cin = width
        total += n
    assert mnasnet.size() == total == 15_216_811_431_690_240
    assert total < 128 * 192 * 288**4 * 192  # the product, which counted no-op skips


def counts_without_skip(b) -> int:
    ops = sum(len(b.expansion) if op == "mbconv" else 1 for op in b.op)
    return ops * len(b.kernel) * len(b.se_ratio)


@pytest.mark.parametrize("name", ["mnasnet", "mobilenet_v3", "mobilenet_v3_large", "tiny"])
def test_to_dict_is_json_and_round_trips(name):
    space = load_space(name)
    data = space.to_dict()
    assert json.loads(json.dumps(data)) == data  # stored in study user attrs, compared on resume
    assert SearchSpace.from_dict(data) == space


def test_tiny_space_builds_small_networks_at_32px(tiny):
    import torch

    from nas.model import build_model

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):
        model = build_model(tiny.sample(study.ask()), num_classes=10).eval()
        assert sum(p.numel() for p in model.parameters()) < 50_000
        with torch.no_grad():
            assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def _tiny_data() -> dict:
    return yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())


def _set(path: tuple, value):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        d[path[-1]] = value
    return edit


def _drop(path: tuple):
    def edit(d):
        for key in path[:-1]:
            d = d[key]
        del d[path[-1]]
    return edit


@pytest.mark.parametrize("edit, fragment", [
    (_set(("blocks", 1, "choices", "kernel"), [3, 4]),
     "blocks[1].choices.kernel: 4 is not allowed; expected one of [1, 3, 5, 7]"),
    (_set(("blocks", 0, "choices", "op"), ["conv", "foo"]),
     "blocks[0].choices.op: 'foo' is not allowed; expected one of ['conv', 'sepconv', 'mbconv']"),
    (_set(("blocks", 1, "choices", "se_ratio"), []),
     "blocks[1].choices.se_ratio: expected a non-empty list of choices"),
    (_set(("blocks", 1, "choices", "width"), [1.0]), "blocks[1].choices: unknown field 'width'"),
    (_set(("blocks", 1, "depth"), 3), "blocks[1]: unknown field 'depth'"),
    (_set(("searchspace",), 1), "unknown field 'searchspace'"),
    (_drop(("blocks", 2, "filters")), "blocks[2]: missing field 'filters'"),
    (_drop(("blocks", 2, "choices", "kernel")), "blocks[2].choices: missing field 'kernel'"),
    (_set(("blocks", 0, "filters"), -8), "blocks[0]: filters=-8 must be an integer >= 1"),
    (_set(("blocks", 0, "stride"), 3), "blocks[0]: stride=3 is not allowed; expected one of"),
    (_set(("blocks", 2, "choices", "filters_mult"), [0.0, 1.0]),
     "blocks[2].choices.filters_mult: 0.0 is not allowed; expected numbers > 0"),
    (_set(("blocks", 2, "choices", "repeats_delta"), [-2, 0]),
     "blocks[2].choices.repeats_delta: repeats 2 + -2 = 0; every choice must leave >= 1 repeat"),
    (_set(("blocks", 1, "choices", "expansion"), [3, 3]), "3 is listed twice"),
    (_drop(("blocks", 1, "choices", "expansion")),
     "blocks[1].choices: op includes mbconv, so expansion choices are needed"),
    (_set(("blocks", 0, "choices", "expansion"), [3, 6]),
     "blocks[0].choices.expansion: applies to mbconv only"),
    (_set(("blocks", 0, "act"), "gelu"), "blocks[0]: act='gelu' is not allowed"),
    (_set(("stem", "kernel"), 4), "stem: kernel=4 is not allowed"),
    (_set(("head", "colour"), "red"), "head: unknown field 'colour'"),
    (_set(("blocks",), []), "blocks must be a non-empty list"),
])
def test_malformed_space_files_name_file_and_field(tmp_path, edit, fragment):
    data = copy.deepcopy(_tiny_data())
    edit(data)
    path = tmp_path / "bad_space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpaceError) as err:
        load_space(path)
    msg = str(err.value)
    assert msg.startswith(str(path)), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_unreadable_yaml_is_a_space_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("blocks: [\n")
    with pytest.raises(SpaceError, match="broken.yaml: not valid YAML"):
        load_space(path)


def test_space_module_has_no_torch_dependency():
    code = ("import sys, nas.space; s = nas.space.load_space('mnasnet'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_binary_file_is_a_space_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00blocks")
    with pytest.raises(SpaceError, match="binary.yaml: not a text file"):
        load_space(path)


def test_a_fixed_stem_kernel_written_as_a_float_is_refused_on_load(tmp_path):
    data = load_space("tiny").to_dict()
    data["stem"]["kernel"] = 3.0
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((SpaceError, ArchError), match="kernel=3.0 is not allowed"):
        load_space(path)


def test_mobilenet_v3_small_is_a_member_of_the_mobilenet_v3_space():
    space = load_space("mobilenet_v3")
    v3 = load_architecture("mobilenet_v3_small")
    params = space.params_of(v3)
    assert params["se_gate"] == "hardsigmoid" and params["b3_act"] == "hswish"
    assert dataclasses.replace(space.sample(optuna.trial.FixedTrial(params)), name=v3.name) == v3
    assert set(params) <= set(space.param_choices())
    with pytest.raises(SpaceError, match="mobilenet_v2: head.filters=1280 is not a choice"):
        space.params_of(load_architecture("mobilenet_v2"))


def test_mobilenet_v3_large_is_a_member_of_its_space_with_torchvision_s_shapes():
    space = load_space("mobilenet_v3_large")
    v3 = load_architecture("mobilenet_v3_large")
    params = space.params_of(v3)
    assert (params["b5_expansion"], params["b6_expansion"]) == (2.5, 2.3)  # 200 and 184 over 80
    arch = space.sample(optuna.trial.FixedTrial(params))
    assert dataclasses.replace(arch, name=v3.name) == v3

    def shapes(net: torch.nn.Module) -> list[tuple[int, ...]]:
        return sorted(tuple(t.shape) for t in net.state_dict().values())

    assert shapes(build_model(arch, num_classes=1000)) == shapes(
        torchvision.models.mobilenet_v3_large())
    with pytest.raises(SpaceError, match="mobilenet_v3_small: has 7 blocks; space "
                                         "mobilenet_v3_large has 9"):
        space.params_of(load_architecture("mobilenet_v3_small"))
    assert space.size() > load_space("mobilenet_v3").size()


def test_network_wide_choices_are_sampled_and_inverted():
    space = load_space("mobilenet_v3")
    params = {**space.params_of(load_architecture("mobilenet_v3_small")),
              "stem_filters": 32, "head_filters": 960, "se_gate": "sigmoid", "b0_act": "hswish"}
    arch = space.sample(optuna.trial.FixedTrial(params))
    assert (arch.stem.filters, arch.head.filters, arch.settings.se_gate) == (32, 960, "sigmoid")
    assert arch.blocks[0].act == "hswish" and arch.stem.act == "hswish"  # the stem's act is fixed
    assert space.params_of(arch) == params
    assert {"stem_filters", "head_filters", "se_gate"} <= set(space.param_choices())
    build_model(arch, num_classes=10)  # a network the builder takes


def test_network_choices_multiply_the_size_and_are_validated(tmp_path):
    base = yaml.safe_load((SPACES_DIR / "tiny.yaml").read_text())
    fixed = SearchSpace.from_dict(base)
    head = SearchSpace.from_dict({**base, "choices": {"head_filters": [32, 64, 96],
                                                       "se_gate": ["sigmoid", "hardsigmoid"]}})
    assert head.size() == fixed.size() * 3 * 2
    # a stem width changes where block 0 can take a shortcut: counted, not multiplied blindly
    stem = SearchSpace.from_dict({**base, "choices": {"stem_filters": [8, 16]}})
    assert fixed.size() < stem.size() <= 2 * fixed.size()
    assert fixed.to_dict() == SearchSpace.from_dict(fixed.to_dict()).to_dict()
    assert "choices" not in fixed.to_dict()  # a study's stored space is unchanged
    assert all("act" not in b["choices"] for b in fixed.to_dict()["blocks"])
    assert SearchSpace.from_dict(head.to_dict()) == head
    for bad, fragment in (({"stem_filters": [0]}, "choices.stem_filters: 0 is not allowed"),
                          ({"se_gate": ["relu"]}, "choices.se_gate: 'relu' is not allowed"),
                          ({"width": [1]}, "choices: unknown field 'width'"),
                          ([16], "choices: must be a mapping")):
        with pytest.raises(SpaceError, match=re.escape(fragment)):
            SearchSpace.from_dict({**base, "choices": bad})
    both = {**base, "blocks": [{**base["blocks"][0], "act": "relu", "choices": {
        **base["blocks"][0]["choices"], "act": ["relu", "hswish"]}}, *base["blocks"][1:]]}
    with pytest.raises(SpaceError, match="act is fixed and also in choices"):
        SearchSpace.from_dict(both)
