"""The fidelity benchmark's budget names and merging, which its committed tables depend on."""

import importlib.util
import json
from pathlib import Path

import pytest

from nas.proxy import ProxyBudget

_PATH = Path(__file__).parent.parent / "benchmarks" / "proxy_fidelity.py"
_spec = importlib.util.spec_from_file_location("proxy_fidelity", _PATH)
fidelity = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fidelity)


def test_budget_names_replace_only_the_fields_they_name():
    b = fidelity.parse_budget("fm2 4000x3 b128 lr0.003")
    assert (b.final_map, b.train_images, b.epochs, b.batch_size, b.lr) == (2, 4000, 3, 128, 0.003)
    assert b.weight_decay == ProxyBudget().weight_decay
    assert fidelity.parse_budget("fm1 16000x2 @zen4") == fidelity.parse_budget("fm1 16000x2")
    with pytest.raises(SystemExit, match="token 'x2'"):
        fidelity.parse_budget("fm1 x2")


def test_a_tagged_merge_becomes_columns_beside_this_run(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"0|fm1 8000x2": {"accuracy": 0.3, "seconds": 20.0}}))
    assert fidelity.merged_state(str(other)) == {"0|fm1 8000x2": {"accuracy": 0.3, "seconds": 20.0}}
    assert fidelity.merged_state(f"{other}@zen4") == {
        "0|fm1 8000x2 @zen4": {"accuracy": 0.3, "seconds": 20.0}}


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
