"""The search space: a YAML table of blocks and their choices, mapped to specs by an Optuna trial.

MnasNet's factorized hierarchical space (Tan et al., CVPR 2019, Section 4.1): the network is a
fixed sequence of blocks laid over a backbone (MobileNetV2's), and each block searches its own op,
kernel, expansion, squeeze-and-excite ratio, skip, repeat count and width; all repeats inside a
block share them. Nothing here imports torch: `SearchSpace.sample` turns a trial into an
`Architecture` (pure data) and `nas.model.build_model` does the rest.

A block whose choices contain a single value has that factor fixed (no Optuna parameter). The
expansion ratio is a conditional parameter: `b{i}_expansion` is suggested only in trials that chose
`mbconv` for block i, which is what Optuna's define-by-run API is for. The file lists width
multipliers; the parameter `b{i}_filters` asks the distinct widths they round to (16 x 0.75 and
16 x 1.0 are one choice, 16), so no two parameter values name one network.

A block's activation may be searched too (`choices.act`, MobileNetV3 style), and a top-level
`choices:` may search the network-wide factors: the stem's and the head's widths and the
squeeze-and-excite gate (parameters `stem_filters`, `head_filters`, `se_gate`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from nas.arch import (
    ACTS,
    KERNELS,
    OPS,
    SE_GATES,
    SKIPS,
    SPACES_DIR,
    ArchError,
    Architecture,
    BlockSpec,
    Head,
    Settings,
    Stem,
    make_divisible,
    yaml_problem,
)

if TYPE_CHECKING:  # annotations only: importing the space needs neither optuna nor torch
    from optuna.trial import BaseTrial

DEFAULT_SPACE = "mnasnet"
FILTER_DIVISOR = 8  # searched widths are rounded like MobileNetV2's width multiplier
# A block's factors, as the space file names them; `param_name` gives their Optuna parameter names.
FACTORS = ("op", "kernel", "expansion", "se_ratio", "skip", "repeats_delta", "filters_mult",
           "act")
# Network-wide factors a space may search (top-level `choices:`), each its own Optuna parameter.
NETWORK_FACTORS = ("stem_filters", "head_filters", "se_gate")
_PARAM_SUFFIX = {"filters_mult": "filters"}  # the parameter's values are widths, not multipliers
_BASE_KEYS = ("filters", "repeats", "stride", "act")


class SpaceError(ValueError):
    """A malformed space, or an architecture outside it: one line naming file, block, field."""


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# Per factor: (test of one value, the rule said in errors). repeats_delta is also checked against
# the block's base repeats; whatever slips through is caught by building the min/max networks.
_VALUE_RULES: dict[str, tuple[Any, str]] = {
    "op": (lambda v: v in OPS, f"one of {list(OPS)}"),
    "kernel": (lambda v: _is_int(v) and v in KERNELS, f"one of {list(KERNELS)}"),
    "expansion": (lambda v: _is_number(v) and 0 < v <= 16, "numbers > 0 and <= 16"),
    "se_ratio": (lambda v: _is_number(v) and 0 <= v <= 1, "numbers >= 0 and <= 1"),
    "skip": (lambda v: v in SKIPS, f"one of {list(SKIPS)}"),
    "repeats_delta": (_is_int, "integers"),
    "filters_mult": (lambda v: _is_number(v) and v > 0, "numbers > 0"),
    "act": (lambda v: v in ACTS, f"one of {list(ACTS)}"),
    "stem_filters": (lambda v: _is_int(v) and v >= 1, "integers >= 1"),
    "head_filters": (lambda v: _is_int(v) and v >= 1, "integers >= 1"),
    "se_gate": (lambda v: v in SE_GATES, f"one of {list(SE_GATES)}"),
}


@dataclass(frozen=True)
class BlockChoices:
    """One block of the backbone (base width, repeats, stride) and the choices searched for it."""

    filters: int
    repeats: int
    stride: int
    op: tuple[str, ...]
    kernel: tuple[int, ...]
    expansion: tuple[float, ...] = ()  # empty when no op choice is mbconv
    se_ratio: tuple[float, ...] = (0.0,)
    skip: tuple[str, ...] = ("identity",)
    repeats_delta: tuple[int, ...] = (0,)
    filters_mult: tuple[float, ...] = (1.0,)
    act: tuple[str, ...] = ("relu",)

    def choices(self, factor: str) -> tuple:
        return getattr(self, factor)

    def options(self, factor: str) -> tuple:
        """The values sampling asks: the listed choices, but widths for the multipliers.

        Two multipliers that round to one width (16 x 0.75 -> 16) would name one network twice
        and double that width's odds under random sampling.
        """
        return tuple(self.widths()) if factor == "filters_mult" else self.choices(factor)

    def searched(self) -> list[str]:
        """Factors with more than one option: those that become Optuna parameters."""
        return [f for f in FACTORS if len(self.options(f)) > 1]

    def width(self, mult: float) -> int:
        return make_divisible(self.filters * mult, FILTER_DIVISOR)

    def widths(self) -> list[int]:
        """Distinct output widths: two multipliers can round to the same width (16 x 0.75 -> 16)."""
        return sorted({self.width(m) for m in self.filters_mult})

    def spec(self, *, op: str, kernel: int, expansion: float, se_ratio: float, skip: str,
             repeats_delta: int, filters: int, act: str | None = None) -> BlockSpec:
        return BlockSpec(op=op, kernel=kernel, filters=filters, stride=self.stride,
                         repeats=self.repeats + repeats_delta,
                         expansion=expansion if op == "mbconv" else 1, se_ratio=se_ratio,
                         skip=skip, act=act or self.act[0])

    def size(self) -> int:
        """Block specs, every skip choice counted (SearchSpace.size drops those with no effect)."""
        return self.layer_variants() * len(self.skip) * len(self.repeats_delta) * len(
            self.widths())

    def layer_variants(self) -> int:
        """Op (with expansion for mbconv), kernel, SE and activation combinations."""
        ops = sum(len(self.expansion) if op == "mbconv" else 1 for op in self.op)
        return ops * len(self.kernel) * len(self.se_ratio) * len(self.act)

    def skip_matters(self, cin: int, repeats: int, width: int) -> bool:
        """Can any layer take a shortcut? Only at stride 1 with equal widths (nas.blocks)."""
        return repeats > 1 or (self.stride == 1 and cin == width)

    def extreme(self, *, largest: bool) -> BlockSpec:
        """Smallest or largest choice of every factor, with mbconv when it is allowed."""
        pick = max if largest else min
        op = "mbconv" if "mbconv" in self.op else self.op[0]
        return self.spec(op=op, kernel=pick(self.kernel),
                         expansion=pick(self.expansion) if self.expansion else 1,
                         se_ratio=pick(self.se_ratio), skip=self.skip[0],
                         repeats_delta=pick(self.repeats_delta),
                         filters=pick(self.widths()))

    def to_dict(self) -> dict[str, Any]:
        """The file format; a fixed activation stays the block's `act` (as older files had it,
        so a stored study's space compares equal)."""
        choices = {f: list(self.choices(f)) for f in FACTORS if self.choices(f) and f != "act"}
        fixed = {"act": self.act[0]} if len(self.act) == 1 else {}
        if not fixed:
            choices["act"] = list(self.act)
        return {"filters": self.filters, "repeats": self.repeats, "stride": self.stride,
                **fixed, "choices": choices}


@dataclass(frozen=True)
class SearchSpace:
    """Blocks with their choices, between a stem and a head, under network-wide settings; the
    stem's and head's widths and the SE gate are fixed unless `network` lists choices."""

    blocks: tuple[BlockChoices, ...]
    stem: Stem = field(default_factory=Stem)
    head: Head = field(default_factory=Head)
    settings: Settings = field(default_factory=Settings)
    name: str = ""
    network: Mapping[str, tuple] = field(default_factory=dict)  # NETWORK_FACTORS -> choices

    def network_options(self, factor: str) -> tuple:
        """A network-wide factor's choices; the fixed value when the space does not search it."""
        if factor in self.network:
            return tuple(self.network[factor])
        return ((self.stem.filters,) if factor == "stem_filters" else
                (self.head.filters,) if factor == "head_filters" else (self.settings.se_gate,))

    def _network_parts(self, stem_filters: int, head_filters: int, se_gate: str
                       ) -> tuple[Stem, Head, Settings]:
        return (dataclasses.replace(self.stem, filters=stem_filters),
                dataclasses.replace(self.head, filters=head_filters),
                dataclasses.replace(self.settings, se_gate=se_gate))

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SearchSpace:
        """Read and strictly validate a space file; every error names the file."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SpaceError(f"{path}: not valid YAML ({yaml_problem(e)})") from None
        except OSError as e:
            raise SpaceError(f"{path}: cannot read ({e.strerror})") from None
        except UnicodeDecodeError:
            raise SpaceError(f"{path}: not a text file (not valid UTF-8); expected a search "
                             f"space .yaml") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "space") -> SearchSpace:
        """Strict: unknown keys, empty or duplicate choices and out-of-range values are errors."""
        if not isinstance(data, Mapping):
            raise SpaceError(f"{where}: expected a mapping with keys name, stem, head, settings, "
                             f"blocks; got {type(data).__name__}")
        _reject_unknown(where, data, ("name", "stem", "head", "settings", "blocks", "choices"))
        network = _parse_network(data.get("choices"), f"{where}: choices")
        raw_blocks = data.get("blocks")
        if not isinstance(raw_blocks, list) or not raw_blocks:
            raise SpaceError(f"{where}: blocks must be a non-empty list of blocks, each with "
                             f"filters, repeats, stride and choices; got {raw_blocks!r}")
        blocks = tuple(_parse_block(raw, f"{where}: blocks[{i}]") for i, raw in
                       enumerate(raw_blocks))
        # Build the smallest and the largest network through nas.arch, so anything the
        # architecture language rejects (bad stem, head, settings, widths) fails here, at load.
        archs = []
        for largest in (False, True):
            pick = max if largest else min
            raw_arch = {"name": data.get("name", ""), "stem": dict(data.get("stem") or {}),
                        "head": dict(data.get("head") or {}),
                        "settings": dict(data.get("settings") or {}),
                        "blocks": [b.extreme(largest=largest).to_str() for b in blocks]}
            for factor, part, key in (("stem_filters", "stem", "filters"),
                                      ("head_filters", "head", "filters"),
                                      ("se_gate", "settings", "se_gate")):
                if factor in network:
                    raw_arch[part][key] = (pick(network[factor]) if factor != "se_gate"
                                           else network[factor][int(largest)
                                                                % len(network[factor])])
            try:
                archs.append(Architecture.from_dict(raw_arch, where=where))
            except ArchError as e:
                raise SpaceError(str(e)) from None
        arch = archs[0]
        if network:  # the file's own stem, head and settings, each searched field at its first
            arch = Architecture.from_dict({**raw_arch, **{
                "stem": {**dict(data.get("stem") or {}), **(
                    {"filters": network["stem_filters"][0]} if "stem_filters" in network else {})},
                "head": {**dict(data.get("head") or {}), **(
                    {"filters": network["head_filters"][0]} if "head_filters" in network else {})},
                "settings": {**dict(data.get("settings") or {}), **(
                    {"se_gate": network["se_gate"][0]} if "se_gate" in network else {})}}},
                where=where)
        return cls(blocks=blocks, stem=arch.stem, head=arch.head, settings=arch.settings,
                   name=arch.name, network=network)

    def sample(self, trial: BaseTrial) -> Architecture:
        """One `suggest_categorical` per block and searched factor, named like ``b0_kernel``.

        Skip is asked only where a layer can take a shortcut; elsewhere the block takes the first
        listed skip (asking would name two identical networks, and the sampler would model a
        choice with no effect).
        """
        def network_pick(factor: str) -> Any:
            values = self.network_options(factor)
            return values[0] if len(values) == 1 else trial.suggest_categorical(factor,
                                                                                list(values))

        stem, head, settings = self._network_parts(*map(network_pick, NETWORK_FACTORS))
        blocks, cin = [], stem.filters
        for i, block in enumerate(self.blocks):
            def pick(factor: str, block: BlockChoices = block, i: int = i) -> Any:
                values = block.options(factor)
                if len(values) == 1:
                    return values[0]
                return trial.suggest_categorical(param_name(i, factor), list(values))

            op = pick("op")
            kernel = pick("kernel")
            expansion = pick("expansion") if op == "mbconv" else 1
            se_ratio, delta, width = pick("se_ratio"), pick("repeats_delta"), pick("filters_mult")
            skip = (pick("skip") if block.skip_matters(cin, block.repeats + delta, width)
                    else block.skip[0])
            act = pick("act")
            blocks.append(block.spec(op=op, kernel=kernel, expansion=expansion,
                                     se_ratio=se_ratio, skip=skip, repeats_delta=delta,
                                     filters=width, act=act))
            cin = width
        return Architecture(blocks=tuple(blocks), stem=stem, head=head, settings=settings)

    def params_of(self, arch: Architecture) -> dict[str, Any]:
        """The trial parameters that sample `arch`, e.g. for `study.enqueue_trial` of a baseline."""
        name = arch.name or "architecture"
        if len(arch.blocks) != len(self.blocks):
            raise SpaceError(f"{name}: has {len(arch.blocks)} blocks; space "
                             f"{self.name or '?'} has {len(self.blocks)}")
        params: dict[str, Any] = {}
        for factor, part, key in (("stem_filters", "stem", "filters"),
                                  ("head_filters", "head", "filters"),
                                  ("se_gate", "settings", "se_gate")):
            value, allowed = getattr(getattr(arch, part), key), self.network_options(factor)
            if len(allowed) > 1:
                if value not in allowed:
                    raise SpaceError(f"{name}: {part}.{key}={value!r} is not a choice; allowed: "
                                     f"{list(allowed)}")
                params[factor] = value
        searched = {(p, k) for f, p, k in (("stem_filters", "stem", "filters"),
                                            ("head_filters", "head", "filters"),
                                            ("se_gate", "settings", "se_gate"))
                    if len(self.network_options(f)) > 1}
        for part in ("stem", "head", "settings"):
            ours, theirs = dataclasses.asdict(getattr(self, part)), dataclasses.asdict(
                getattr(arch, part))
            diff = [k for k in ours if ours[k] != theirs[k] and (part, k) not in searched]
            if diff:
                k = diff[0]
                raise SpaceError(f"{name}: {part}.{k}={theirs[k]!r} but the space fixes "
                                 f"{part}.{k}={ours[k]!r}")
        cin = arch.stem.filters
        for i, (block, spec) in enumerate(zip(self.blocks, arch.blocks, strict=True)):
            found = _block_params(block, spec, i, f"{name}: blocks[{i}]")
            if not block.skip_matters(cin, spec.repeats, spec.filters):
                found.pop(f"b{i}_skip", None)  # as `sample`: not asked where it has no effect
            params.update(found)
            cin = spec.filters
        return params

    def param_choices(self) -> dict[str, tuple]:
        """Every parameter `sample` may ask, with its choices (to check a stored study against)."""
        network = {f: self.network_options(f) for f in NETWORK_FACTORS
                   if len(self.network_options(f)) > 1}
        return {**network, **{param_name(i, f): b.options(f) for i, b in enumerate(self.blocks)
                              for f in FACTORS if len(b.options(f)) > 1}}

    def size(self) -> int:
        """Number of distinct networks: a product over blocks, but skip counts only where a
        layer can take a shortcut, which depends on the width the block before chose."""
        counts = {w: 1 for w in self.network_options("stem_filters")}  # input width ->
        # networks so far that end with it
        for b in self.blocks:
            after: dict[int, int] = {}
            for cin, n in counts.items():
                for width, delta in itertools.product(b.widths(), b.repeats_delta):
                    skips = len(b.skip) if b.skip_matters(cin, b.repeats + delta, width) else 1
                    after[width] = after.get(width, 0) + n * b.layer_variants() * skips
            counts = after
        return (sum(counts.values()) * len(self.network_options("head_filters"))
                * len(self.network_options("se_gate")))

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-able data in the file format (lists, not tuples), e.g. for run metadata."""
        defaults = Settings()
        return {
            "name": self.name,
            "stem": dataclasses.asdict(self.stem),
            "head": dataclasses.asdict(self.head),
            "settings": {k: v for k, v in dataclasses.asdict(self.settings).items()
                         if v != getattr(defaults, k)},
            "blocks": [b.to_dict() for b in self.blocks],
            **({"choices": {f: list(v) for f, v in self.network.items()}} if self.network
               else {}),
        }


def _reject_unknown(where: str, data: Mapping, allowed: Sequence[str]) -> None:
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SpaceError(f"{where}: unknown field {unknown[0]!r}; allowed: {list(allowed)}")


def _parse_block(raw: Any, where: str) -> BlockChoices:
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{where}: expected a mapping with filters, repeats, stride, act, "
                         f"choices; got {raw!r}")
    _reject_unknown(where, raw, (*_BASE_KEYS, "choices"))
    for key in ("filters", "repeats", "stride", "choices"):
        if key not in raw:
            raise SpaceError(f"{where}: missing field {key!r}")
    if not _is_int(raw["filters"]) or raw["filters"] < 1:
        raise SpaceError(f"{where}: filters={raw['filters']!r} must be an integer >= 1")
    if not _is_int(raw["repeats"]) or raw["repeats"] < 1:
        raise SpaceError(f"{where}: repeats={raw['repeats']!r} must be an integer >= 1")
    if not _is_int(raw["stride"]) or raw["stride"] not in (1, 2):
        raise SpaceError(f"{where}: stride={raw['stride']!r} is not allowed; expected one of "
                         f"[1, 2]")
    act = raw.get("act", "relu")
    if act not in ACTS:
        raise SpaceError(f"{where}: act={act!r} is not allowed; expected one of {list(ACTS)}")
    if "act" in raw and "act" in (raw["choices"] if isinstance(raw["choices"], Mapping) else {}):
        raise SpaceError(f"{where}: act is fixed and also in choices; give one of them")
    choices = raw["choices"]
    if not isinstance(choices, Mapping):
        raise SpaceError(f"{where}: choices must be a mapping of factor -> list of values")
    _reject_unknown(f"{where}.choices", choices, FACTORS)
    for key in ("op", "kernel"):
        if key not in choices:
            raise SpaceError(f"{where}.choices: missing field {key!r}")
    values = {f: _parse_values(choices[f], f, f"{where}.choices.{f}")
              for f in FACTORS if f in choices}
    if "mbconv" in values["op"] and "expansion" not in values:
        raise SpaceError(f"{where}.choices: op includes mbconv, so expansion choices are needed "
                         f"(e.g. expansion: [3, 6])")
    if "mbconv" not in values["op"] and "expansion" in values:
        raise SpaceError(f"{where}.choices.expansion: applies to mbconv only, and op choices "
                         f"{list(values['op'])} have none")
    # No clamping: a delta that leaves zero repeats is an error, so each (block, delta) pair is a
    # distinct network and params_of stays an exact inverse.
    for delta in values.get("repeats_delta", ()):
        if raw["repeats"] + delta < 1:
            raise SpaceError(f"{where}.choices.repeats_delta: repeats {raw['repeats']} + "
                             f"{delta} = {raw['repeats'] + delta}; every choice must leave >= 1 "
                             f"repeat")
    values.setdefault("act", (act,))
    return BlockChoices(filters=raw["filters"], repeats=raw["repeats"], stride=raw["stride"],
                        **values)


def _parse_network(raw: Any, where: str) -> dict[str, tuple]:
    """The top-level `choices:` of network-wide factors (none: all fixed)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise SpaceError(f"{where}: must be a mapping of {', '.join(NETWORK_FACTORS)} -> list of "
                         f"values")
    _reject_unknown(where, raw, NETWORK_FACTORS)
    return {f: _parse_values(raw[f], f, f"{where}.{f}") for f in NETWORK_FACTORS if f in raw}


def _parse_values(raw: Any, factor: str, where: str) -> tuple:
    if not isinstance(raw, list) or not raw:
        raise SpaceError(f"{where}: expected a non-empty list of choices; got {raw!r}")
    test, rule = _VALUE_RULES[factor]
    for value in raw:
        if not test(value):
            raise SpaceError(f"{where}: {value!r} is not allowed; expected {rule}")
    dupes = [v for i, v in enumerate(raw) if v in raw[:i]]
    if dupes:
        raise SpaceError(f"{where}: {dupes[0]!r} is listed twice in {raw!r}")
    return tuple(raw)


def _block_params(block: BlockChoices, spec: BlockSpec, i: int, where: str) -> dict[str, Any]:
    for key in ("stride",):
        if getattr(spec, key) != getattr(block, key):
            raise SpaceError(f"{where}: {key}={getattr(spec, key)!r} but the space fixes "
                             f"{key}={getattr(block, key)!r}")
    if spec.pw_act:
        raise SpaceError(f"{where}: pw_act=True is not in the space (always false)")
    found = {"op": spec.op, "kernel": spec.kernel, "se_ratio": spec.se_ratio, "skip": spec.skip,
             "repeats_delta": spec.repeats - block.repeats, "act": spec.act}
    if spec.op == "mbconv":
        found["expansion"] = spec.expansion
    for factor, value in found.items():
        match = [c for c in block.choices(factor) if c == value]
        if not match:
            raise SpaceError(f"{where}: {factor}={value!r} is not a choice; allowed: "
                             f"{list(block.choices(factor))}")
        found[factor] = match[0]  # the choice itself (0 rather than 0.0), as trial.params holds it
    if spec.filters not in block.widths():
        raise SpaceError(f"{where}: filters={spec.filters} is not reachable; allowed: "
                         f"{block.widths()} (base {block.filters} x {list(block.filters_mult)})")
    found["filters_mult"] = spec.filters  # the parameter asks widths (BlockChoices.options)
    return {param_name(i, f): found[f] for f in FACTORS if f in found and len(block.options(f)) > 1}


def param_name(block: int, factor: str) -> str:
    """Optuna parameter of a block's factor: ``b2_kernel``, but ``b2_filters`` for the widths."""
    return f"b{block}_{_PARAM_SUFFIX.get(factor, factor)}"


def space_names() -> list[str]:
    """Names of the search spaces shipped in search_spaces/."""
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def load_space(path_or_name: str | os.PathLike) -> SearchSpace:
    """A space file by path, or a shipped space by name ("mnasnet", "tiny")."""
    path = Path(path_or_name)
    if not path.exists():
        shipped = SPACES_DIR / f"{path_or_name}.yaml"
        if not shipped.exists():
            raise SpaceError(f"{path_or_name}: no such file and not a shipped space; shipped: "
                             f"{', '.join(space_names())}")
        path = shipped
    return SearchSpace.from_yaml(path)
