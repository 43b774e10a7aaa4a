"""ONNX Runtime sessions and feeding them data, for every part of mqtool that runs a model on ORT.

- `ort_session`: the one way mqtool opens a CPU session (calibration, validation, kernel inspection). A
  model over protobuf's 2 GiB goes through a temporary file with external data; that folder lives as long
  as the session (ORT may map the data file) and is deleted with it.
- `sample_axis` / `split_feed`: how a batch of samples is fed to a model whose inputs do not all take a
  free batch on axis 0. Each input has a *sample axis*:

  - axis 0 when the first dimension is free (symbolic or unknown) or fixed to a number `k` with no free
    dimension after it, or fixed to 1: a *fixed batch* of `k` (`[1, 3, 416, 416]`, `[1, 1, 64, W]`);
  - the first free dimension when the first one is a number above 1 and a later one is free: a recurrent
    state laid out `[layers, N, hidden]` (silero's `state [2, N, 128]`);
  - none for a scalar (silero's `sr`): such an input is *shared*, given once and fed unchanged with every
    batch.

  `split_feed` cuts a feed along those axes into runs of the model's fixed batch, so a model exported with
  batch 1 is fed sample by sample whatever batch the data comes in, with the same results as one batched
  run of the same model with a free batch.

Only `mqtool.model` and `mqtool.errors` are imported here, so the data readers, calibration and validation
can all use this module without an import cycle.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import onnx

from mqtool.errors import InputError
from mqtool.model import over_protobuf_limit

log = logging.getLogger(__name__)

THREADS = 2


class _Spec(Protocol):
    """A model input as `mqtool.data.InputSpec` describes it: name and dims (None where free)."""

    name: str
    shape: tuple[int | None, ...] | None


def ort_session(
    model: onnx.ModelProto,
    so: Any = None,
    *,
    outputs: Iterable[str] = (),
    threads: int = THREADS,
) -> Any:
    """A CPU `InferenceSession` of `model` (not modified) with `outputs` added to the graph outputs.

    `so` (an `onnxruntime.SessionOptions`) defaults to `threads` intra-op threads, one inter-op thread,
    all graph optimisations and ORT's own logging silenced. Raises `InputError` when ORT cannot load the
    model, naming the custom-domain ops it holds (the usual cause).
    """
    import onnxruntime as ort

    if so is None:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
    g = model.graph
    existing = {o.name for o in g.output}
    added = [onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(outputs) if t not in existing]
    # Appended for serialisation and taken away again: no copy of a (possibly large) model.
    g.output.extend(added)
    try:
        if not over_protobuf_limit(model):
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        tmp = tempfile.TemporaryDirectory(prefix="mqtool-ort-")
        path = os.path.join(tmp.name, "model.onnx")
        big = onnx.ModelProto()
        big.CopyFrom(model)  # save_model moves the tensors out of the proto it is given
        onnx.save_model(big, path, save_as_external_data=True, location="model.onnx.data")
        del big
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        sess._mqtool_tmp = tmp  # deleted (TemporaryDirectory's finaliser) when the session goes
        return sess
    except Exception as e:
        custom = sorted(
            {f"{n.domain}.{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")}
        )
        also = f" (custom-domain ops in the model: {', '.join(custom)})" if custom else ""
        raise InputError(f"ONNX Runtime cannot load the model: {_short(e)}{also}") from e
    finally:
        for _ in added:
            del g.output[-1]


def sample_axis(shape: Sequence[int | None] | None) -> int | None:
    """The axis of an input of dims `shape` (None where free) that counts samples; None for a shared input
    (a scalar). See the module docstring for the rule."""
    if shape is None:
        return 0
    if len(shape) == 0:
        return None
    first = shape[0]
    if first is None or first == 1:
        return 0
    free = [i for i, d in enumerate(shape) if d is None]
    return free[0] if free else 0


def fixed_batch(specs: Sequence[_Spec]) -> int | None:
    """The number of samples the model takes per run when one of its inputs fixes it (its sample axis is
    a number), else None. Two inputs fixing different sizes are an `InputError`."""
    sizes = {}
    for s in specs:
        axis = sample_axis(s.shape)
        if axis is not None and s.shape is not None and s.shape[axis] is not None:
            sizes[s.name] = s.shape[axis]
    if len(set(sizes.values())) > 1:
        each = ", ".join(f"'{k}' {v}" for k, v in sizes.items())
        raise InputError(f"model inputs fix different batch sizes ({each})")
    return next(iter(sizes.values()), None)


def feed_samples(feed: Mapping[str, np.ndarray], specs: Sequence[_Spec]) -> int:
    """How many samples `feed` holds (along each input's sample axis; shared inputs do not count)."""
    counts = {}
    for s in specs:
        axis = sample_axis(s.shape)
        v = feed[s.name]
        if axis is not None and np.ndim(v) > axis:
            counts[s.name] = np.shape(v)[axis]
    if len(set(counts.values())) > 1:
        each = ", ".join(f"'{k}' {v}" for k, v in counts.items())
        raise InputError(f"inputs hold different numbers of samples ({each})")
    return next(iter(counts.values()), 1)


def split_feed(feed: Mapping[str, np.ndarray], specs: Sequence[_Spec]) -> list[dict[str, np.ndarray]]:
    """`feed` as the runs the model accepts: one run when it has no fixed batch (or the feed matches it),
    else consecutive slices of the fixed batch size along each input's sample axis, shared inputs whole in
    every run. Samples that do not fill a last run are dropped (logged); fewer than one run is an
    `InputError`."""
    k = fixed_batch(specs)
    n = feed_samples(feed, specs)
    if k is None or n == k:
        return [dict(feed)]
    if n < k:
        raise InputError(f"the model takes batches of exactly {k} samples; the data gave {n}")
    if n % k:
        log.info("dropping %d samples that do not fill a batch of %d", n % k, k)
    runs = []
    for start in range(0, n - n % k, k):
        run = {}
        for s in specs:
            v = feed[s.name]
            axis = sample_axis(s.shape)
            if axis is None or np.ndim(v) <= axis:
                run[s.name] = v
            else:
                index = [slice(None)] * np.ndim(v)
                index[axis] = slice(start, start + k)
                run[s.name] = np.ascontiguousarray(v[tuple(index)])
        runs.append(run)
    return runs


def take_samples(v: np.ndarray, axis: int | None, index: slice | np.ndarray | int) -> np.ndarray:
    """Samples `index` (a slice, an index array, or one position kept as a length-1 axis) of an input
    array whose samples lie on `axis`; a shared input (`axis` None, or an array too small to have that axis)
    comes back whole."""
    if axis is None or np.ndim(v) <= axis:
        return v
    if isinstance(index, int | np.integer):
        index = slice(int(index), int(index) + 1)
    return v[(slice(None),) * axis + (index,)]


def samples_in(v: np.ndarray, axis: int | None) -> int | None:
    """How many samples an input array holds on its sample `axis` (None for a shared input)."""
    return None if axis is None or np.ndim(v) <= axis else int(np.shape(v)[axis])


def slice_feed(
    feed: Mapping[str, np.ndarray], specs: Sequence[_Spec], index: slice | np.ndarray
) -> dict[str, np.ndarray]:
    """Samples `index` of every input of `feed` along its sample axis, shared inputs whole."""
    axes = {s.name: sample_axis(s.shape) for s in specs}
    return {k: take_samples(v, axes.get(k, 0), index) for k, v in feed.items()}


def concat_feeds(parts: Sequence[Mapping[str, np.ndarray]], specs: Sequence[_Spec]) -> dict[str, np.ndarray]:
    """Feeds joined along each input's sample axis; a shared input is taken from the first feed."""
    axes = {s.name: sample_axis(s.shape) for s in specs}
    out = {}
    for k in parts[0]:
        axis = axes.get(k, 0)
        values = [p[k] for p in parts]
        if axis is None or np.ndim(values[0]) <= axis:
            out[k] = values[0]
        else:
            out[k] = values[0] if len(values) == 1 else np.concatenate(values, axis=axis)
    return out


def resize_feed(feed: Mapping[str, np.ndarray], specs: Sequence[_Spec], n: int) -> dict[str, np.ndarray]:
    """`feed` with exactly `n` samples along each input's sample axis (samples repeated cyclically), shared
    inputs unchanged: a feed of any batch size for timing."""
    out = {}
    for s in specs:
        v = np.asarray(feed[s.name])
        axis = sample_axis(s.shape)
        if axis is None or v.ndim <= axis:
            out[s.name] = v
            continue
        index = np.arange(n) % v.shape[axis]
        out[s.name] = np.ascontiguousarray(np.take(v, index, axis=axis))
    return out


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
