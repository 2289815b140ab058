"""The architecture language: frozen specs that describe a mobile CNN, with strict parsing.

An `Architecture` is pure data (no torch): the search space produces it, `nas.model.build_model`
turns it into a network, export writes it as YAML/JSON. Each block has a compact one-line form
in the spirit of timm's arch defs, e.g. ``mb6_k5_s2_se0.25_r3_c40`` or ``sep_k3_s1_r1_c16_noskip``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from nas.files import write_atomic

OPS = ("conv", "sepconv", "mbconv")
KERNELS = (1, 3, 5, 7)
STRIDES = (1, 2)
ACTS = ("relu", "relu6", "hswish")
SKIPS = ("identity", "none")
SE_FROM = ("expanded", "input")
SE_GATES = ("sigmoid", "hardsigmoid")
# How a width multiplier (`name@0.75`) scales the head conv: kept (torchvision's MNASNet),
# scaled only above 1 (MobileNetV2), scaled (MobileNetV1), or kept the same multiple of the last
# block's width (MobileNetV3: 6x); and the expanded widths: a ratio of the scaled input
# (MobileNetV2, MNASNet) or the unscaled network's expanded width, scaled (MobileNetV3).
WIDTH_HEAD = ("fixed", "grow", "scaled", "last")
WIDTH_EXPANDED = ("ratio", "absolute")
MIN_WIDTH_MULT, MAX_WIDTH_MULT = 0.05, 4.0

# String tokens: op prefix -> op name (the expansion ratio follows `mb`).
_OP_PREFIX = {"conv": "conv", "sep": "sepconv", "mb": "mbconv"}
_DEFAULT_ACT = "relu"

# Shipped configs live in the repo's search_spaces/, installed as the package nas.search_spaces.
SPACES_DIR = Path(str(resources.files("nas.search_spaces")))
ARCH_DIR = SPACES_DIR / "archs"


class ArchError(ValueError):
    """A malformed architecture: the message names the place, the value and what is allowed."""


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round channels to a multiple of `divisor` (hardware-friendly), never dropping below 90%."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _fmt(x: float) -> str:
    """Shortest lossless decimal form of a number, for block strings."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(float(x))


def yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong and where, in one line (its message spans several)."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return str(e).splitlines()[0]


# Bounds far above any mobile network (EfficientNet-B7's widest layer: 3840 channels; its longest
# stage: 10 layers) that stop a typo (c16000000) from reaching torch, where it overflows or asks
# for terabytes.
MAX_WIDTH = 16384
MAX_REPEATS = 256


def _check_choice(where: str, name: str, value: Any, allowed: tuple) -> None:
    # by type too: 3.0 == 3 and True == 1, but torch wants an int kernel (an edited config's 3.0
    # reached Conv2d and failed there)
    if not any(value == a and type(value) is type(a) for a in allowed):
        raise ArchError(f"{where}: {name}={value!r} is not allowed; "
                        f"expected one of {list(allowed)}")


def _check_int(where: str, name: str, value: Any, *, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ArchError(f"{where}: {name}={value!r} must be an integer from {minimum} to {maximum}")


def _check_float(where: str, name: str, value: Any, *, lo: float, hi: float, lo_open=False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}"
        raise ArchError(f"{where}: {name}={value!r} must be a number {bound}")


@dataclass(frozen=True)
class BlockSpec:
    """One stage: `repeats` copies of an op; only the first repeat has `stride`."""

    op: str
    kernel: int
    filters: int
    stride: int = 1
    repeats: int = 1
    expansion: float = 1.0
    se_ratio: float = 0.0
    skip: str = "identity"
    act: str = _DEFAULT_ACT
    pw_act: bool = False  # sepconv only: activation after the pointwise conv (MobileNetV1 style)

    def validate(self, where: str = "block") -> None:
        """Raise ArchError naming the first bad field."""
        _check_choice(where, "op", self.op, OPS)
        _check_choice(where, "kernel", self.kernel, KERNELS)
        _check_int(where, "filters", self.filters, minimum=1, maximum=MAX_WIDTH)
        _check_choice(where, "stride", self.stride, STRIDES)
        _check_int(where, "repeats", self.repeats, minimum=1, maximum=MAX_REPEATS)
        _check_float(where, "expansion", self.expansion, lo=0.0, hi=16.0, lo_open=True)
        if self.op != "mbconv" and self.expansion != 1:
            raise ArchError(f"{where}: expansion={self.expansion!r} applies to mbconv only; "
                            f"op {self.op!r} needs expansion 1")
        _check_float(where, "se_ratio", self.se_ratio, lo=0.0, hi=1.0)
        _check_choice(where, "skip", self.skip, SKIPS)
        _check_choice(where, "act", self.act, ACTS)
        if not isinstance(self.pw_act, bool):
            raise ArchError(f"{where}: pw_act={self.pw_act!r} must be true or false")
        if self.pw_act and self.op != "sepconv":
            raise ArchError(f"{where}: pw_act applies to sepconv only, not {self.op!r}")

    def to_str(self) -> str:
        """Compact one-line form, e.g. ``mb6_k5_s2_se0.25_r3_c40``."""
        head = {"conv": "conv", "sepconv": "sep", "mbconv": f"mb{_fmt(self.expansion)}"}[self.op]
        parts = [head, f"k{self.kernel}", f"s{self.stride}"]
        if self.se_ratio:
            parts.append(f"se{_fmt(self.se_ratio)}")
        parts += [f"r{self.repeats}", f"c{self.filters}"]
        if self.act != _DEFAULT_ACT:
            parts.append(self.act)
        if self.skip == "none":
            parts.append("noskip")
        if self.pw_act:
            parts.append("pwact")
        return "_".join(parts)

    @classmethod
    def from_str(cls, text: str, where: str = "block") -> BlockSpec:
        """Strict inverse of `to_str`: unknown or repeated tokens are errors, never ignored."""
        tokens = text.strip().split("_")
        kwargs: dict[str, Any] = _parse_op_token(tokens[0], where, text)
        for tok in tokens[1:]:
            key, value = _parse_token(tok, where, text)
            if key in kwargs:
                raise ArchError(f"{where}: {text!r} sets {key} twice")
            kwargs[key] = value
        missing = [k for k in ("kernel", "stride", "repeats", "filters") if k not in kwargs]
        if missing:
            raise ArchError(f"{where}: {text!r} lacks {', '.join(missing)} "
                            f"(tokens k<kernel>, s<stride>, r<repeats>, c<filters>)")
        spec = cls(**kwargs)
        spec.validate(where)
        return spec


def _parse_op_token(tok: str, where: str, text: str) -> dict[str, Any]:
    if tok in ("conv", "sep"):
        return {"op": _OP_PREFIX[tok]}
    if tok.startswith("mb"):
        return {"op": "mbconv", "expansion": _number(tok[2:], where, text, "expansion")}
    raise ArchError(f"{where}: {text!r} starts with unknown op {tok!r}; "
                    f"expected conv, sep or mb<expansion> (e.g. mb6)")


_INT_TOKENS = {"k": "kernel", "s": "stride", "r": "repeats", "c": "filters"}
_FLAG_TOKENS = {"noskip": ("skip", "none"), "pwact": ("pw_act", True)}


def _parse_token(tok: str, where: str, text: str) -> tuple[str, Any]:
    if tok in ACTS:
        return "act", tok
    if tok in _FLAG_TOKENS:
        return _FLAG_TOKENS[tok]
    if tok.startswith("se"):
        return "se_ratio", _number(tok[2:], where, text, "se_ratio")
    if tok[:1] in _INT_TOKENS and tok[1:].isdigit():
        return _INT_TOKENS[tok[0]], int(tok[1:])
    raise ArchError(f"{where}: unknown token {tok!r} in {text!r}; expected k<int>, s<int>, "
                    f"r<int>, c<int>, se<ratio>, {', '.join(ACTS)}, noskip or pwact")


def _number(s: str, where: str, text: str, name: str) -> float:
    try:
        value = float(s)
    except ValueError:
        raise ArchError(f"{where}: {name} {s!r} in {text!r} is not a number") from None
    return int(value) if value.is_integer() else value


@dataclass(frozen=True)
class Stem:
    """The first k x k conv that takes the image."""

    filters: int = 32
    kernel: int = 3
    stride: int = 2
    act: str = "relu"

    def validate(self, where: str = "stem") -> None:
        _check_int(where, "filters", self.filters, minimum=1, maximum=MAX_WIDTH)
        _check_choice(where, "kernel", self.kernel, KERNELS)
        _check_choice(where, "stride", self.stride, STRIDES)
        _check_choice(where, "act", self.act, ACTS)


@dataclass(frozen=True)
class Head:
    """Final 1x1 conv (filters 0 = none), then pool, optional hidden FC, dropout, classifier."""

    filters: int = 1280
    act: str = "relu"
    hidden: int = 0  # MobileNetV3 puts a biased Linear + activation between pool and classifier
    hidden_act: str = "hswish"
    dropout: float = 0.2

    def validate(self, where: str = "head") -> None:
        _check_int(where, "filters", self.filters, minimum=0, maximum=MAX_WIDTH)
        _check_choice(where, "act", self.act, ACTS)
        _check_int(where, "hidden", self.hidden, minimum=0, maximum=MAX_WIDTH)
        _check_choice(where, "hidden_act", self.hidden_act, ACTS)
        _check_float(where, "dropout", self.dropout, lo=0.0, hi=0.99)


@dataclass(frozen=True)
class Settings:
    """Network-wide choices where published families differ (SE form, BN constants, rounding)."""

    # squeeze width = se_ratio x expanded width (MobileNetV3) or x block input width (MnasNet)
    se_from: str = "expanded"
    se_gate: str = "sigmoid"  # MobileNetV3 uses hardsigmoid
    se_act: str = "relu"
    se_divisor: int = 1  # MobileNetV3 rounds the squeeze width to a multiple of 8
    divisor: int = 8  # rounding of expanded widths
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1  # PyTorch convention: weight of the new batch statistic
    width_head: str = "fixed"  # how `@m` scales the head conv (WIDTH_HEAD)
    width_hidden: str = "fixed"  # and the hidden FC: "fixed" or "scaled" (MobileNetV3)
    width_expanded: str = "ratio"  # and the expanded widths (WIDTH_EXPANDED)

    def validate(self, where: str = "settings") -> None:
        _check_choice(where, "width_head", self.width_head, WIDTH_HEAD)
        _check_choice(where, "width_hidden", self.width_hidden, ("fixed", "scaled"))
        _check_choice(where, "width_expanded", self.width_expanded, WIDTH_EXPANDED)
        _check_choice(where, "se_from", self.se_from, SE_FROM)
        _check_choice(where, "se_gate", self.se_gate, SE_GATES)
        _check_choice(where, "se_act", self.se_act, ACTS)
        _check_int(where, "se_divisor", self.se_divisor, minimum=1, maximum=MAX_WIDTH)
        _check_int(where, "divisor", self.divisor, minimum=1, maximum=MAX_WIDTH)
        _check_float(where, "bn_eps", self.bn_eps, lo=0.0, hi=1.0, lo_open=True)
        _check_float(where, "bn_momentum", self.bn_momentum, lo=0.0, hi=1.0, lo_open=True)


@dataclass(frozen=True)
class Architecture:
    """A whole network: stem -> blocks -> head, plus network-wide settings."""

    blocks: tuple[BlockSpec, ...]
    stem: Stem = field(default_factory=Stem)
    head: Head = field(default_factory=Head)
    settings: Settings = field(default_factory=Settings)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        self.validate()

    def validate(self) -> None:
        if not self.blocks:
            raise ArchError("blocks: an architecture needs at least one block")
        self.stem.validate()
        for i, block in enumerate(self.blocks):
            block.validate(f"blocks[{i}]")
        self.head.validate()
        self.settings.validate()

    @property
    def total_stride(self) -> int:
        """Downsampling factor from input to the final feature map."""
        return self.stem.stride * math.prod(b.stride for b in self.blocks)

    def to_str(self) -> str:
        """All blocks on one line, for logs and plot hovers."""
        return " ".join(b.to_str() for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        """Plain data; blocks as their one-line strings, which is what users edit."""
        defaults = Settings()
        return {
            "name": self.name,
            "stem": dataclasses.asdict(self.stem),
            "blocks": [b.to_str() for b in self.blocks],
            "head": dataclasses.asdict(self.head),
            "settings": {k: v for k, v in dataclasses.asdict(self.settings).items()
                         if v != getattr(defaults, k)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "architecture") -> Architecture:
        """Strict: unknown keys are errors; blocks are strings or mappings of BlockSpec fields."""
        if not isinstance(data, Mapping):
            raise ArchError(f"{where}: expected a mapping with keys stem, blocks, head, settings")
        _reject_unknown(where, data, {"name", "stem", "blocks", "head", "settings"})
        if "blocks" not in data:
            raise ArchError(f"{where}: missing field 'blocks'")
        raw_blocks = data["blocks"]
        if not isinstance(raw_blocks, list):
            raise ArchError(f"{where}: blocks must be a list of block strings or mappings")
        blocks = tuple(_block_from_any(b, f"{where}: blocks[{i}]")
                       for i, b in enumerate(raw_blocks))
        try:
            return cls(
                blocks=blocks,
                stem=_section(Stem, data.get("stem", {}), f"{where}: stem"),
                head=_section(Head, data.get("head", {}), f"{where}: head"),
                settings=_section(Settings, data.get("settings", {}), f"{where}: settings"),
                name=str(data.get("name", "") or ""),
            )
        except ArchError as e:
            msg = str(e)
            raise ArchError(msg if msg.startswith(where) else f"{where}: {msg}") from None

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "architecture") -> Architecture:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ArchError(f"{where}: not valid YAML ({yaml_problem(e)})") from None
        return cls.from_dict(data, where)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, where: str = "architecture") -> Architecture:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArchError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(data, where)


def _reject_unknown(where: str, data: Mapping, allowed: set[str]) -> None:
    unknown = sorted(set(data) - allowed, key=str)  # YAML keys may be numbers too
    if unknown:
        raise ArchError(f"{where}: unknown field {unknown[0]!r}; allowed: {sorted(allowed)}")


def _section(cls: type, data: Any, where: str):
    if not isinstance(data, Mapping):
        fields = [f.name for f in dataclasses.fields(cls)]
        raise ArchError(f"{where}: expected a mapping of {fields}")
    _reject_unknown(where, data, {f.name for f in dataclasses.fields(cls)})
    obj = cls(**data)
    obj.validate(where)
    return obj


def _block_from_any(raw: Any, where: str) -> BlockSpec:
    if isinstance(raw, str):
        return BlockSpec.from_str(raw, where)
    if isinstance(raw, Mapping):
        _reject_unknown(where, raw, {f.name for f in dataclasses.fields(BlockSpec)})
        missing = [k for k in ("op", "kernel", "filters") if k not in raw]
        if missing:
            raise ArchError(f"{where}: missing field {missing[0]!r}")
        spec = BlockSpec(**raw)
        spec.validate(where)
        return spec
    raise ArchError(f"{where}: expected a block string like 'mb6_k3_s2_r2_c24' or a mapping, "
                    f"got {type(raw).__name__}")


def reference_names() -> list[str]:
    """Names of the reference networks shipped as config files."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.yaml"))


def load_architecture(path_or_name: str | Path) -> Architecture:
    """Read an architecture from a .yaml/.yml/.json file, or a shipped reference network by name;
    either with `@m` appended (e.g. mobilenet_v2@0.75) is scaled by width multiplier m."""
    path = Path(path_or_name)
    text = str(path_or_name)
    base, at, mult = text.rpartition("@")
    if not path.exists() and at and "/" not in mult and "\\" not in mult:
        if "@" in Path(base).name and not Path(base).exists():
            raise ArchError(f"{text}: one width multiplier at most (NAME@m)")
        return scale_width(load_architecture(base), _width_mult(mult, text))
    if not path.exists():
        ref = ARCH_DIR / f"{path_or_name}.yaml"
        if ref.exists():
            path = ref
        else:
            raise ArchError(f"{path_or_name}: no such file and not a reference network; "
                            f"references: {', '.join(reference_names())}")
    if not path.is_file():
        raise ArchError(f"{path}: not a file; expected an architecture .yaml/.yml/.json")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ArchError(f"{path}: cannot be read ({e})") from None
    if path.suffix == ".json":
        return Architecture.from_json(text, where=str(path))
    return Architecture.from_yaml(text, where=str(path))


def _width_mult(text: str, where: str) -> float:
    try:
        mult = float(text)
    except ValueError:
        mult = math.nan
    if not MIN_WIDTH_MULT <= mult <= MAX_WIDTH_MULT:  # NaN fails too
        raise ArchError(f"{where}: width multiplier {text!r} must be a number from "
                        f"{MIN_WIDTH_MULT:g} to {MAX_WIDTH_MULT:g}")
    return mult


def scale_width(arch: Architecture, mult: float) -> Architecture:
    """The network `arch` at width multiplier `mult`, rounded as its family publishes it (the
    settings' width_* fields): mobilenet_v2@0.5 has torchvision's mobilenet_v2(width_mult=0.5)
    weight shapes, mnasnet_b1@0.5 those of its mnasnet0_5."""
    div = arch.settings.divisor

    def width(c: float) -> int:
        return make_divisible(c * mult, div)

    blocks, cin, cin_scaled = [], arch.stem.filters, width(arch.stem.filters)
    for b in arch.blocks:
        out = width(b.filters)
        spec = dataclasses.replace(b, filters=out)
        if b.op == "mbconv" and b.expansion != 1:
            # each repeat after the first takes the block's own width as input
            inputs = [(cin, cin_scaled)] + [(b.filters, out)] * (b.repeats - 1)
            if arch.settings.width_expanded == "absolute":
                ratios = {width(make_divisible(c * b.expansion, div)) / s for c, s in inputs}
                if len(ratios) > 1:  # one expansion per block string: split the first repeat
                    first = dataclasses.replace(spec, repeats=1,
                                                expansion=width(make_divisible(
                                                    cin * b.expansion, div)) / cin_scaled)
                    rest = dataclasses.replace(spec, stride=1, repeats=b.repeats - 1,
                                               expansion=width(make_divisible(
                                                   b.filters * b.expansion, div)) / out)
                    blocks += [first, rest]
                    cin, cin_scaled = b.filters, out
                    continue
                spec = dataclasses.replace(spec, expansion=ratios.pop())
        blocks.append(spec)
        cin, cin_scaled = b.filters, out
    h = arch.head
    head_filters = {"fixed": h.filters, "grow": make_divisible(h.filters * max(1.0, mult), div),
                    "scaled": width(h.filters) if h.filters else 0,
                    "last": (h.filters * blocks[-1].filters // arch.blocks[-1].filters
                             if h.filters % arch.blocks[-1].filters == 0 else width(h.filters)),
                    }[arch.settings.width_head]
    hidden = width(h.hidden) if h.hidden and arch.settings.width_hidden == "scaled" else h.hidden
    return dataclasses.replace(
        arch, name=f"{arch.name}@{mult:g}" if arch.name else "",
        stem=dataclasses.replace(arch.stem, filters=width(arch.stem.filters)),
        blocks=tuple(blocks), head=dataclasses.replace(h, filters=head_filters, hidden=hidden))


def architecture_text(arch: Architecture, path: str | Path) -> str:
    """What `save_architecture` writes to `path`: JSON by suffix, else YAML."""
    return arch.to_json() if Path(path).suffix == ".json" else arch.to_yaml()


def save_architecture(arch: Architecture, path: str | Path) -> Path:
    """Write YAML (or JSON by suffix) atomically, so an interrupted export leaves no half file."""
    return write_atomic(Path(path), architecture_text(arch, path))


def adapt_to_input(arch: Architecture, input_size: int, *, min_final: int = 4) -> Architecture:
    """Set the earliest stride-2 layers to stride 1 until the final map is >= `min_final` pixels.

    ImageNet stacks downsample 32x: on CIFAR's 32x32 images that leaves a 1x1 map. Like the
    usual CIFAR ports of MobileNet, we drop the earliest strides first (stem, then the first
    downsampling blocks), keeping the later stages and every channel width as searched.
    """
    stem, blocks = arch.stem, list(arch.blocks)
    while input_size // _total(stem, blocks) < min_final:
        if stem.stride == 2:
            stem = dataclasses.replace(stem, stride=1)
            continue
        i = next((i for i, b in enumerate(blocks) if b.stride == 2), None)
        if i is None:
            break
        blocks[i] = dataclasses.replace(blocks[i], stride=1)
    return dataclasses.replace(arch, stem=stem, blocks=tuple(blocks))


def _total(stem: Stem, blocks: list[BlockSpec]) -> int:
    return stem.stride * math.prod(b.stride for b in blocks)
