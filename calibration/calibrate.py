"""Run the float model in ONNX Runtime with the tensors to calibrate as extra outputs and observe them."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
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
) -> dict[str, tuple[float, float]]:
    """(lo, hi) of every tensor in `tensors` over `data`, by `method` (minmax, percentile, entropy, mse).

    `tensors` maps tensor name -> bits (entropy and mse optimise for that width; default 8). The model is
    run unmodified apart from the extra outputs, and is not changed.
    """
    opts = method if isinstance(method, CalibrationOptions) else CalibrationOptions(method=method)
    bits = dict(tensors) if isinstance(tensors, Mapping) else dict.fromkeys(tensors, 8)
    if not bits:
        return {}
    names = list(bits)
    _check_in_main_graph(model, names)
    specs = model_inputs(model)
    session = ort_session(model, outputs=names, threads=opts.threads)
    observers = {t: Observer(histogram=opts.method != "minmax", bins=opts.bins) for t in names}
    seen = 0
    for feed in iter_feeds(data, model, opts.batch_size, opts.max_samples):
        # A model exported with a fixed batch (often 1) runs the batch in slices of that size.
        for run in split_feed(feed, specs):
            try:
                outs = session.run(names, run)
            except Exception as e:
                raise InputError(
                    f"the model fails in ONNX Runtime on the calibration data: {_short(e)}"
                ) from e
            for t, value in zip(names, outs):
                if value.dtype.kind != "f":
                    raise InputError(f"tensor '{t}' is {value.dtype}, only float tensors can be quantized")
                if not np.isfinite(
                    value
                ).all():  # an overflow in the float model: no finite range to quantize
                    raise InputError(
                        f"tensor '{t}' becomes NaN or Inf in the float model on the calibration data "
                        f"(batch starting at sample {seen}): it cannot be quantized"
                    )
                observers[t].update(value)
            seen += feed_samples(run, specs)
    if seen == 0:
        raise InputError("calibration data is empty")
    log.info("calibrated %d tensors on %d samples (%s)", len(names), seen, opts.method)
    return {t: observers[t].range(opts.method, bits[t], opts.percentile) for t in names}


def _check_in_main_graph(model: onnx.ModelProto, names: list[str]) -> None:
    """ONNX Runtime can only output tensors of the main graph: one living inside an If/Loop body is named
    in an `InputError` instead of ORT's "graph output does not exist"."""
    g = model.graph
    main = {i.name for i in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}
    inside = [t for t in names if t not in main]
    if not inside:
        return
    for scoped in scoped_graphs(g)[1:]:
        body = {o for n in scoped.graph.node for o in n.output} | {i.name for i in scoped.graph.input}
        found = [t for t in inside if t in body]
        if found:
            where = "/".join(f"{node}.{attr}" for node, attr in scoped.scope)
            raise InputError(
                f"tensor '{found[0]}' lives inside the subgraph {where}: calibrating tensors inside "
                "If/Loop bodies on ONNX Runtime is not supported yet"
            )
    raise InputError(f"tensor '{inside[0]}' is not in the model")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
