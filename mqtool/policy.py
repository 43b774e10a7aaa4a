"""The per-layer bit-width policy: the contract between search, emission and report.

JSON form (version 1)::

    {"format": "mqtool.policy", "version": 1,
     "layers": {"<onnx node name>": {"weight_bits": 4, "act_bits": 8}, ...}}

weight_bits is 2..8 or 32 (float); act_bits (the layer's *input* activation) is 2..8 or 32. A layer
missing from the file stays float. Average weight bits everywhere is
sum(bits_l * params_l) / sum(params_l) over the quantizable layers' weights, float layers counting 32.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError

FORMAT = "mqtool.policy"
VERSION = 1
WEIGHT_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 32})
ACT_BITS = frozenset({2, 3, 4, 5, 6, 7, 8, 32})
FLOAT = 32
MAX_POLICY_BYTES = 16 * 2**20


@dataclass(frozen=True)
class LayerBits:
    weight_bits: int = 8
    act_bits: int = 8

    @property
    def quantized(self) -> bool:
        return self.weight_bits != FLOAT


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
            "layers": {
                n: {"weight_bits": b.weight_bits, "act_bits": b.act_bits} for n, b in self.layers.items()
            },
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
        if type(version) is not int or version != VERSION:
            raise InputError(f"{source}: field 'version' must be {VERSION}, got {version!r}")
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
            extra = set(entry) - {"weight_bits", "act_bits"}
            if extra:
                raise InputError(f"{where}: unknown field '{sorted(extra)[0]}'")
            wb = _bits(entry, "weight_bits", WEIGHT_BITS, where, 8)
            ab = _bits(entry, "act_bits", ACT_BITS, where, 8)
            out[name] = LayerBits(wb, ab)
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
