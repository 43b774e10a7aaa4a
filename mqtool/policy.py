"""The per-layer bit-width policy: the contract between search, emission and report.

JSON form (version 3)::

    {"format": "mqtool.policy", "version": 3,
     "layers": {"<onnx node name>": {"weight_bits": 4, "act_bits": 8, "format": "int8"},
                "<another>": {"weight_bits": 4, "act_bits": 32, "format": "nbits", "block_size": 32}, ...}}

weight_bits is 2..8 or 32 (float); act_bits (the layer's *input* activation) is 2..8 or 32. A layer
missing from the file stays float. `format` (optional) is how the layer is realised in the emitted model:

- `float`: untouched (weight_bits 32);
- `int8`: k-bit values in INT8 containers; with a quantized input (act_bits < 32) ORT runs integer kernels;
- `packed`: the smallest container (INT2 / INT4 / INT8), meant weight-only (act_bits 32);
- `nbits`: weight-only (act_bits 32) MatMul form that ORT runs as MatMulNBits (2/4/8-bit containers),
  per-column scales or, with `block_size` (16, 32, ... a power of two), one scale per block of K rows;
- `dynamic`: a MatMul (or a Gemm that is MatMul + bias) whose k-bit weight sits in an INT8 container and
  whose float input (act_bits 32 in the graph) the kernel quantizes itself at run time, 8 bits per tensor
  (com.microsoft.DynamicQuantizeMatMul, ORT's `quantize_dynamic` form; integer kernels, no calibration).

Which formats a layer can take is `passes.qdq_plan.allowed_formats`. Without a format (every version-1
file, which still loads with its old meaning) the conversion's storage mode decides. Version 3 added
`dynamic`; version-2 files load unchanged. Average weight bits
everywhere is sum(bits_l * params_l) / sum(params_l) over the quantizable layers' weights, float layers
counting 32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from enum import StrEnum

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError

FORMAT = "mqtool.policy"
VERSION = 3
VERSIONS = (1, 2, 3)  # version 1: no per-layer format; version 3: format 'dynamic'
WEIGHT_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 32})
ACT_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 32})
FLOAT = 32
MAX_POLICY_BYTES = 16 * 2**20


class Format(StrEnum):
    """How a layer is realised in the emitted model (module doc)."""

    FLOAT = "float"
    INT8 = "int8"
    PACKED = "packed"
    NBITS = "nbits"
    DYNAMIC = "dynamic"


WEIGHT_ONLY_FORMATS = frozenset({Format.NBITS})
# Formats whose layer reads a float input in the graph (act_bits 32): weight-only ones, and `dynamic`,
# whose kernel quantizes its input itself.
FLOAT_INPUT_FORMATS = WEIGHT_ONLY_FORMATS | {Format.DYNAMIC}
BLOCK_SIZES = frozenset({0} | {2**k for k in range(4, 13)})  # 0: one scale per output channel


@dataclass(frozen=True)
class LayerBits:
    """One layer's policy: weight bits, input activation bits, and optionally its format (None: the
    conversion's storage mode decides) and the block size of block-wise scales (0: per channel)."""

    weight_bits: int = 8
    act_bits: int = 8
    format: Format | None = None
    block_size: int = 0

    def __post_init__(self) -> None:
        if self.format is not None:
            object.__setattr__(self, "format", Format(self.format))
        problem = _layer_problem(self)
        if problem:
            raise ValueError(problem)

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT

    def to_json(self) -> dict:
        doc: dict = {"weight_bits": self.weight_bits, "act_bits": self.act_bits}
        if self.format is not None:
            doc["format"] = self.format.value
        if self.block_size:
            doc["block_size"] = self.block_size
        return doc


def _layer_problem(b: LayerBits) -> str | None:
    """What is inconsistent in `b` (None when nothing), in the policy file's field names."""
    f = b.format
    if f is Format.FLOAT and b.weight_bits != FLOAT:
        return f"format 'float' needs weight_bits 32, got {b.weight_bits}"
    if f is not None and f is not Format.FLOAT and b.weight_bits == FLOAT:
        return f"weight_bits 32 (float) cannot take format '{f.value}'"
    if f in WEIGHT_ONLY_FORMATS and b.act_bits != FLOAT:
        return f"format '{f.value}' is weight-only: act_bits must be 32, got {b.act_bits}"
    if f is Format.DYNAMIC and b.act_bits != FLOAT:
        return (
            f"format 'dynamic' quantizes its float input at run time (8 bits): act_bits must be 32, "
            f"got {b.act_bits}"
        )
    if b.block_size not in BLOCK_SIZES:
        return f"block_size must be 0 or a power of two from 16 to 4096, got {b.block_size}"
    if b.block_size and f is not Format.NBITS:
        return "block_size needs format 'nbits'"
    return None


@dataclass
class Policy:
    """Layer name -> bits. `meta` carries free-form provenance (budget, fitness, seed) into the JSON."""

    layers: dict[str, LayerBits]
    meta: dict = field(default_factory=dict)

    @classmethod
    def uniform(cls, names: list[str], weight_bits: int, act_bits: int = 8) -> Policy:
        return cls({n: LayerBits(weight_bits, act_bits) for n in names})

    def get(self, name: str) -> LayerBits:
        """Bits of `name`; a layer the policy does not mention stays float."""
        return self.layers.get(name, LayerBits(FLOAT, FLOAT))

    def to_json(self) -> dict:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "layers": {n: b.to_json() for n, b in self.layers.items()},
        }
        if self.meta:
            doc["meta"] = self.meta
        return doc

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, doc: object, source: str = "policy", known: list[str] | None = None) -> Policy:
        """Validate a parsed JSON document; every problem is an `InputError` naming `source` and the field."""
        if not isinstance(doc, dict):
            raise InputError(f"{source}: expected a JSON object with 'format', 'version', 'layers'")
        if doc.get("format") != FORMAT:
            raise InputError(f"{source}: field 'format' must be '{FORMAT}', got {doc.get('format')!r}")
        version = doc.get("version")
        if type(version) is not int or version not in VERSIONS:
            raise InputError(f"{source}: field 'version' must be one of {list(VERSIONS)}, got {version!r}")
        layers = doc.get("layers")
        if not isinstance(layers, dict):
            raise InputError(f"{source}: field 'layers' must be an object of layer name -> bits")
        known_set = set(known) if known is not None else None
        out: dict[str, LayerBits] = {}
        for name, entry in layers.items():
            where = f"{source}: layers['{name}']"
            if known_set is not None and name not in known_set:
                hint = ", ".join(sorted(known_set)[:5])
                raise InputError(f"{where}: unknown layer (the model's quantizable layers include {hint}...)")
            if not isinstance(entry, dict):
                raise InputError(f'{where}: expected an object like {{"weight_bits": 4, "act_bits": 8}}')
            fields = {"weight_bits", "act_bits"} | ({"format", "block_size"} if version >= 2 else set())
            extra = set(entry) - fields
            if extra:
                hint = " (per-layer formats need version 2)" if extra & {"format", "block_size"} else ""
                raise InputError(f"{where}: unknown field '{sorted(extra)[0]}'{hint}")
            wb = _bits(entry, "weight_bits", WEIGHT_BITS, where, 8)
            ab = _bits(entry, "act_bits", ACT_BITS, where, 8)
            fmt = entry.get("format")
            if fmt is not None and fmt not in {f.value for f in Format}:
                raise InputError(f"{where}.format: {fmt!r} not in {[f.value for f in Format]}")
            if fmt == Format.DYNAMIC.value and version < 3:
                raise InputError(f"{where}.format: 'dynamic' needs version 3 (this file says {version})")
            block = entry.get("block_size", 0)
            if type(block) is not int:
                raise InputError(f"{where}.block_size: expected an integer, got {block!r}")
            try:
                out[name] = LayerBits(wb, ab, Format(fmt) if fmt is not None else None, block)
            except ValueError as e:
                raise InputError(f"{where}: {e}") from e
        meta = doc.get("meta", {})
        if not isinstance(meta, dict):
            raise InputError(f"{source}: field 'meta' must be an object")
        return cls(out, meta)

    @classmethod
    def load(cls, path: str, known: list[str] | None = None) -> Policy:
        if not os.path.isfile(path):
            raise InputError(f"{path}: no such policy file")
        if os.path.getsize(path) > MAX_POLICY_BYTES:
            raise InputError(f"{path}: policy file larger than {MAX_POLICY_BYTES >> 20} MiB, refused")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            doc = json.loads(text, object_pairs_hook=_no_duplicates(path))
        except InputError:
            raise
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not valid JSON ({e})") from e
        return cls.from_json(doc, path, known)


def _no_duplicates(path: str):
    def hook(pairs):
        keys = [k for k, _ in pairs]
        dup = {k for k in keys if keys.count(k) > 1}
        if dup:
            raise InputError(f"{path}: duplicate key '{sorted(dup)[0]}'")
        return dict(pairs)

    return hook


def _bits(entry: dict, key: str, allowed: frozenset[int], where: str, default: int) -> int:
    value = entry.get(key, default)
    if type(value) is not int:
        raise InputError(f"{where}.{key}: expected an integer, got {value!r}")
    if value not in allowed:
        raise InputError(f"{where}.{key}: {value} not in {sorted(allowed)}")
    return value


def average_weight_bits(policy: Policy, layers: list[LayerInfo]) -> float:
    """sum(bits * params) / sum(params) over `layers`; layers missing from the policy count 32."""
    total = sum(layer.params for layer in layers)
    if total == 0:
        return float(FLOAT)
    return sum(policy.get(layer.name).weight_bits * layer.params for layer in layers) / total


def bitops(policy: Policy, layers: list[LayerInfo]) -> int:
    """sum(MACs * weight_bits * act_bits); layers of unknown MACs count as zero."""
    return sum(
        (layer.macs or 0) * policy.get(layer.name).weight_bits * policy.get(layer.name).act_bits
        for layer in layers
    )


def bitops_ratio(policy: Policy, layers: list[LayerInfo]) -> float:
    """BitOPs of `policy` relative to uniform w8a8."""
    ref = sum((layer.macs or 0) * 64 for layer in layers)
    return bitops(policy, layers) / ref if ref else 0.0
