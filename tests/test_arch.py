"""The architecture language: lossless round trips and strict, located errors."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from nas.arch import (
    ArchError,
    Architecture,
    BlockSpec,
    Stem,
    adapt_to_input,
    load_architecture,
    make_divisible,
    reference_names,
    save_architecture,
)

REFERENCES = ["mnasnet_a1", "mnasnet_b1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_large",
              "mobilenet_v3_small"]


def test_all_reference_networks_ship():
    assert reference_names() == REFERENCES


@pytest.mark.parametrize("name", REFERENCES)
def test_round_trips_are_lossless(name, tmp_path):
    arch = load_architecture(name)
    assert Architecture.from_dict(arch.to_dict()) == arch
    assert Architecture.from_yaml(arch.to_yaml()) == arch
    assert Architecture.from_json(arch.to_json()) == arch
    for block in arch.blocks:
        assert BlockSpec.from_str(block.to_str()) == block
    for suffix in (".yaml", ".json"):
        assert load_architecture(save_architecture(arch, tmp_path / f"a{suffix}")) == arch


def test_block_string_encodes_every_field():
    spec = BlockSpec(op="mbconv", kernel=5, filters=40, stride=2, repeats=3, expansion=6,
                     se_ratio=0.25, skip="none", act="hswish")
    assert spec.to_str() == "mb6_k5_s2_se0.25_r3_c40_hswish_noskip"
    assert BlockSpec.from_str("mb6_k5_s2_se0.25_r3_c40") == dataclasses.replace(
        spec, skip="identity", act="relu")
    assert BlockSpec.from_str("mb3.67_k3_s1_r1_c24").expansion == 3.67
    sep = BlockSpec.from_str("sep_k3_s2_r1_c128_noskip_pwact")
    assert (sep.op, sep.pw_act, sep.skip, sep.stride) == ("sepconv", True, "none", 2)
    # Tokens in any order parse to the same spec; the canonical string is fixed.
    assert BlockSpec.from_str("mb6_c40_r3_s2_k5").to_str() == "mb6_k5_s2_r3_c40"


@pytest.mark.parametrize("text, fragment", [
    ("mb6_k4_s2_r1_c24", "kernel=4"),
    ("mb6_k3_s3_r1_c24", "stride=3"),
    ("foo_k3_s1_r1_c24", "unknown op 'foo'"),
    ("mb6_k3_s1_r1", "lacks filters"),
    ("mb6_k3_s1_r1_c24_x9", "unknown token 'x9'"),
    ("mb6_k3_s1_r1_c24_k5", "kernel twice"),
    ("mb6_k3_s1_r0_c24", "repeats=0"),
    ("mb6_k3_s1_r257_c24", "repeats=257 must be an integer from 1 to 256"),
    ("mb6_k3_s1_r1_c16385", "filters=16385 must be an integer from 1 to 16384"),
    ("mb6_k3_s1_r1_c100000000000000000000", "must be an integer from 1 to 16384"),  # crashed torch
    ("sep_k3_s1_r1_c24_se-1", "se_ratio"),
    ("conv_k3_s1_r1_c24_pwact", "pw_act applies to sepconv only"),
])
def test_bad_block_strings_name_field(text, fragment):
    with pytest.raises(ArchError) as err:
        BlockSpec.from_str(text, where="cfg.yaml: blocks[3]")
    assert "cfg.yaml: blocks[3]" in str(err.value)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_errors_in_files_name_file_block_and_field(tmp_path):
    good = load_architecture("mnasnet_a1").to_dict()
    cases = {
        "negative filters": (lambda d: d["blocks"].__setitem__(2, {"op": "mbconv", "kernel": 3,
                                                                   "filters": -8}), "blocks[2]",
                             "filters=-8"),
        "missing field": (lambda d: d["blocks"].__setitem__(1, {"op": "mbconv", "kernel": 3}),
                          "blocks[1]", "missing field 'filters'"),
        "unknown op": (lambda d: d["blocks"].__setitem__(0, {"op": "dwconv", "kernel": 3,
                                                             "filters": 16}),
                       "blocks[0]", "op='dwconv'"),
        "bad stem": (lambda d: d["stem"].__setitem__("stride", 3), "stem", "stride=3"),
        "unknown key": (lambda d: d["head"].__setitem__("pool", "max"), "head", "'pool'"),
        "bad act": (lambda d: d["head"].__setitem__("act", "gelu"), "head", "act='gelu'"),
    }
    for label, (mutate, place, fragment) in cases.items():
        data = json.loads(json.dumps(good))
        mutate(data)
        path = tmp_path / f"{label.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ArchError) as err:
            load_architecture(path)
        msg = str(err.value)
        assert str(path) in msg and place in msg and fragment in msg, (label, msg)


def test_unknown_reference_lists_the_known_ones():
    with pytest.raises(ArchError, match="mobilenet_v2"):
        load_architecture("mobilenet_v9")


def test_architecture_is_frozen():
    arch = load_architecture("mobilenet_v2")
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.blocks = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        arch.blocks[0].filters = 8


def test_make_divisible_matches_torchvision():
    from torchvision.models._utils import _make_divisible
    for v in [3, 8, 12, 18, 30, 36, 88.08, 183.99, 1000, 0.75 * 24, 1.25 * 320]:
        assert make_divisible(v, 8) == _make_divisible(v, 8)


def test_adapt_to_input_drops_earliest_strides_only():
    arch = load_architecture("mobilenet_v2")  # total stride 32
    small = adapt_to_input(arch, 32, min_final=4)
    assert small.total_stride == 8
    assert small.stem.stride == 1
    assert [b.stride for b in small.blocks] == [1, 1, 2, 2, 1, 2, 1]
    assert [b.filters for b in small.blocks] == [b.filters for b in arch.blocks]
    assert adapt_to_input(arch, 224, min_final=4) == arch  # 224 / 32 = 7 already fine


def test_arch_module_has_no_torch_dependency():
    code = "import sys, nas.arch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_stem_defaults_validate():
    with pytest.raises(ArchError, match="kernel=4"):
        Architecture(blocks=(BlockSpec("conv", 3, 8),), stem=Stem(kernel=4))


@pytest.mark.parametrize("place, field, value", [
    ("stem", "kernel", 3.0),  # 3.0 == 3 in Python; an edited export reached Conv2d with it
    ("stem", "stride", 2.0),
    ("stem", "kernel", True),  # True == 1
    ("block", "kernel", 5.0),
    ("block", "stride", True),
])
def test_choices_must_have_the_allowed_type_not_just_compare_equal(tmp_path, place, field,
                                                                   value):
    data = load_architecture("mnasnet_a1").to_dict()
    if place == "stem":
        data["stem"][field] = value
    else:
        block = dataclasses.asdict(BlockSpec.from_str(data["blocks"][1]))
        data["blocks"][1] = {**block, field: value}
    path = tmp_path / "edited.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ArchError) as err:
        load_architecture(path)
    assert f"{field}={value!r} is not allowed" in str(err.value) and "\n" not in str(err.value)


def test_unknown_keys_of_mixed_types_are_named_not_a_sort_error(tmp_path):
    path = tmp_path / "keys.yaml"
    data = load_architecture("mnasnet_a1").to_dict()
    data["stem"] |= {1: 2, "foo": 3}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ArchError, match=r"stem: unknown field 1; allowed"):
        load_architecture(path)


def test_yaml_syntax_errors_say_where(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nblocks:\n  - [mb6_k3\n  stem: 1\n")
    with pytest.raises(ArchError) as err:
        load_architecture(path)
    assert "not valid YAML" in str(err.value) and "line 4" in str(err.value)
    assert "\n" not in str(err.value)
