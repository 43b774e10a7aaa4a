"""Set `metadata_props` entries (replacing those with the same keys, keeping the others).

Before::  metadata_props {author: "x"}
After::   metadata_props {author: "x", mqtool.version: "0.1.0", mqtool.policy: "{...}"}
"""

from __future__ import annotations

from collections.abc import Mapping

import onnx

from passes.base import PassResult


def set_metadata(model: onnx.ModelProto, props: Mapping[str, str]) -> PassResult:
    """Write `props` into `model.metadata_props` (in place), in the order given."""
    keep = [(p.key, p.value) for p in model.metadata_props if p.key not in props]
    before = [(p.key, p.value) for p in model.metadata_props]
    after = keep + [(k, str(v)) for k, v in props.items()]
    if after == before:
        return PassResult(model, False)
    del model.metadata_props[:]
    for k, v in after:
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    return PassResult(model, True)
