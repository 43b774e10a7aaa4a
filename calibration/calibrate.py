"""Run the float model in ONNX Runtime with the tensors to calibrate as extra outputs and observe them.

ONNX Runtime can only output tensors of the main graph. Tensors inside If/Loop bodies are read through a
`TensorReader` the caller supplies (the PyTorch backend's `OnnxModule.read_tensors`: this package imports
neither torch nor the backend) and go into the same observers. A body tensor that no calibration sample
reaches (an If branch the data never takes) gets no range: it is left out of the result, with a warning,
and the caller keeps it float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from calibration.observers import DEFAULT_BINS, METHODS, Observer
from calibration.readers import DataSource, iter_feeds
from mqtool.data import model_inputs
from mqtool.errors import InputError
from mqtool.model import scoped_graphs
from mqtool.runtime import feed_samples, ort_session, split_feed

log = logging.getLogger(__name__)

TensorReader = Callable[[dict[str, np.ndarray], list[str]], Mapping[str, "np.ndarray | None"]]
"""(feed, tensor names) -> name -> value for that feed, None for a tensor the run did not compute."""


@dataclass(frozen=True)
class CalibrationOptions:
    """How activation ranges are estimated. `max_samples` caps the data used (the first samples, in file
    order); `threads` is fixed so the same inputs give the same ranges on any machine."""

    method: str = "percentile"
    percentile: float = 99.99
    batch_size: int = 64
    max_samples: int | None = 2048
    bins: int = DEFAULT_BINS
    threads: int = 2

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"calibration method '{self.method}' not in {', '.join(METHODS)}")


def calibrate(
    model: onnx.ModelProto,
    tensors: Mapping[str, int] | Iterable[str],
    data: DataSource,
    method: str | CalibrationOptions = "percentile",
    *,
    subgraph_reader: TensorReader | None = None,
) -> dict[str, tuple[float, float]]:
    """(lo, hi) of every tensor in `tensors` over `data`, by `method` (minmax, percentile, entropy, mse).

    `tensors` maps tensor name -> bits (entropy and mse optimise for that width; default 8). The model is
    run unmodified apart from the extra outputs, and is not changed. Tensors inside If/Loop bodies are
    read with `subgraph_reader` (an `InputError` without one); those the data never reaches are absent
    from the result (module docstring).
    """
    opts = method if isinstance(method, CalibrationOptions) else CalibrationOptions(method=method)
    bits = dict(tensors) if isinstance(tensors, Mapping) else dict.fromkeys(tensors, 8)
    if not bits:
        return {}
    names = list(bits)
    body = _body_tensors(model, names)
    if body and subgraph_reader is None:
        t, where = next(iter(body.items()))
        raise InputError(
            f"tensor '{t}' lives inside the subgraph {where}: ONNX Runtime cannot output it, and no "
            "subgraph_reader (the PyTorch backend's OnnxModule.read_tensors) was given"
        )
    main = [t for t in names if t not in body]
    specs = model_inputs(model)
    session = ort_session(model, outputs=main, threads=opts.threads) if main else None
    observers = {t: Observer(histogram=opts.method != "minmax", bins=opts.bins) for t in names}
    reached: set[str] = set()
    seen = 0
    for feed in iter_feeds(data, model, opts.batch_size, opts.max_samples):
        # A model exported with a fixed batch (often 1) runs the batch in slices of that size.
        for run in split_feed(feed, specs):
            values: list[tuple[str, np.ndarray | None]] = []
            if session is not None:
                try:
                    values += zip(main, session.run(main, run))
                except Exception as e:
                    raise InputError(
                        f"the model fails in ONNX Runtime on the calibration data: {_short(e)}"
                    ) from e
            if body:
                got = subgraph_reader(run, list(body))
                values += [(t, got.get(t)) for t in body]
            for t, value in values:
                if value is None:  # a branch this run did not take
                    continue
                value = np.asarray(value)
                if value.dtype.kind != "f":
                    raise InputError(f"tensor '{t}' is {value.dtype}, only float tensors can be quantized")
                if not np.isfinite(value).all():  # an overflow in the float model: no finite range
                    raise InputError(
                        f"tensor '{t}' becomes NaN or Inf in the float model on the calibration data "
                        f"(batch starting at sample {seen}): it cannot be quantized"
                    )
                observers[t].update(value)
                reached.add(t)
            seen += feed_samples(run, specs)
    if seen == 0:
        raise InputError("calibration data is empty")
    unreached = [t for t in body if t not in reached]
    by_body: dict[str, list[str]] = {}
    for t in unreached:
        by_body.setdefault(body[t], []).append(t)
    for where, ts in by_body.items():
        log.warning(
            "%d tensor%s inside %s (%s): no calibration sample reaches %s (the branch never runs on the "
            "data); %s no activation quantization",
            len(ts),
            "s" if len(ts) > 1 else "",
            where,
            ", ".join(f"'{t}'" for t in ts[:3]) + (", ..." if len(ts) > 3 else ""),
            "them" if len(ts) > 1 else "it",
            "they keep" if len(ts) > 1 else "it keeps",
        )
    log.info("calibrated %d tensors on %d samples (%s)", len(names) - len(unreached), seen, opts.method)
    return {t: observers[t].range(opts.method, bits[t], opts.percentile) for t in names if t in reached}


def _body_tensors(model: onnx.ModelProto, names: list[str]) -> dict[str, str]:
    """The tensors of `names` that live inside an If/Loop body -> where ("If_0.then_branch"); an
    `InputError` for a name the model does not have."""
    g = model.graph
    main = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    inside = [t for t in names if t not in main]
    out: dict[str, str] = {}
    if not inside:
        return out
    for scoped in scoped_graphs(g)[1:]:
        body = {o for n in scoped.graph.node for o in n.output} | {i.name for i in scoped.graph.input}
        body |= {i.name for i in scoped.graph.initializer}
        where = "/".join(f"{node}.{attr}" for node, attr in scoped.scope)
        for t in inside:
            if t in body and t not in out:
                out[t] = where
    missing = [t for t in inside if t not in out]
    if missing:
        raise InputError(f"tensor '{missing[0]}' is not in the model")
    return out


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
