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

import torch

from mqtool.errors import InputError
from mqtool.fileio import atomic_write_bytes


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
