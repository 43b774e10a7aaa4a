"""Checkpoints of long runs (MetaQuantNet training, GA generations) in the work directory.

Saved atomically; loaded with `torch.load(weights_only=True)` only, so a checkpoint can never run code.
Each checkpoint carries a fingerprint of what produced it (model, data, options); a checkpoint with another
fingerprint is ignored (a fresh start), a corrupt one is an error unless the caller asked for a restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping

import numpy as np
import onnx
import torch

from mqtool.errors import InputError
from mqtool.fileio import atomic_write_bytes
from mqtool.search import distributed


def fingerprint(*parts: object) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, bytes | bytearray):
            h.update(p)
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def save(path: str, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str, expected_fingerprint: str, restart_on_corrupt: bool = False) -> dict | None:
    """The checkpoint at `path` if it exists and matches; None for a fresh start."""
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if restart_on_corrupt:
            return None
        raise InputError(
            f"{path}: corrupt or foreign checkpoint ({type(e).__name__}); delete it or pass --restart"
        ) from e
    if not isinstance(state, dict) or state.get("fingerprint") != expected_fingerprint:
        return None
    return state


def load_shared(path: str, expected_fingerprint: str, restart_on_corrupt: bool = False) -> dict | None:
    """`load` on rank 0, sent to the other ranks (nodes need no shared disk). Every rank fails the same
    way on a corrupt checkpoint, or the others would hang in the broadcast."""
    if distributed.world() == 1:
        return load(path, expected_fingerprint, restart_on_corrupt)
    box: tuple = ("ok", None)
    if distributed.is_main():
        try:
            box = ("ok", load(path, expected_fingerprint, restart_on_corrupt))
        except InputError as e:
            box = ("error", str(e))
    box = distributed.broadcast(box)
    if box[0] == "error":
        raise InputError(box[1])
    return box[1]


def save_main(path: str, state: dict) -> None:
    """`save`, by rank 0 only."""
    if distributed.is_main():
        save(path, state)


def model_digest(model: onnx.ModelProto) -> str:
    """Part by part: a model over 2 GiB cannot be serialised whole, but each tensor and node can."""
    h = hashlib.sha256()
    g = model.graph
    for part in (
        model.opset_import,
        model.functions,
        g.input,
        g.output,
        g.node,
        g.initializer,
        g.sparse_initializer,
    ):
        h.update(str(len(part)).encode())
        for item in part:
            h.update(item.SerializeToString(deterministic=True))
    return h.hexdigest()


def data_digest(inputs: Mapping[str, np.ndarray], y: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(inputs[k]).tobytes())
    if y is not None:
        h.update(np.ascontiguousarray(y).tobytes())
    return h.hexdigest()


def clear_temporaries(workdir: str) -> None:
    """Create `workdir` and remove the temporary files of a killed run (outputs are renamed into place)."""
    if not distributed.is_main():
        return
    os.makedirs(workdir, exist_ok=True)
    for f in os.listdir(workdir):
        if f.startswith(".") and f.endswith(".tmp"):
            os.unlink(os.path.join(workdir, f))


def read_json(path: str) -> dict | None:
    """A small JSON state file (the time plan), None when missing or unreadable (then it is rewritten)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
