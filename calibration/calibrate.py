"""Run the float model in ONNX Runtime with the tensors to calibrate as extra outputs and observe them."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from calibration.observers import DEFAULT_BINS, METHODS, Observer
from calibration.readers import DataSource, iter_feeds
from mqtool.errors import InputError
from mqtool.model import over_protobuf_limit

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
    session = _session(model, names, opts.threads)
    observers = {t: Observer(histogram=opts.method != "minmax", bins=opts.bins) for t in names}
    seen = 0
    for feed in iter_feeds(data, model, opts.batch_size, opts.max_samples):
        try:
            outs = session.run(names, feed)
        except Exception as e:
            raise InputError(f"the model fails in ONNX Runtime on the calibration data: {_short(e)}") from e
        for t, value in zip(names, outs):
            if value.dtype.kind != "f":
                raise InputError(f"tensor '{t}' is {value.dtype}, only float tensors can be quantized")
            if not np.isfinite(value).all():  # an overflow in the float model: no finite range to quantize
                raise InputError(
                    f"tensor '{t}' becomes NaN or Inf in the float model on the calibration data "
                    f"(batch starting at sample {seen}): it cannot be quantized"
                )
            observers[t].update(value)
        seen += len(next(iter(feed.values())))
    if seen == 0:
        raise InputError("calibration data is empty")
    log.info("calibrated %d tensors on %d samples (%s)", len(names), seen, opts.method)
    return {t: observers[t].range(opts.method, bits[t], opts.percentile) for t in names}


def _session(model: onnx.ModelProto, outputs: list[str], threads: int):
    import onnxruntime as ort

    g = model.graph
    existing = {o.name for o in g.output}
    added = [onnx.helper.make_empty_tensor_value_info(t) for t in outputs if t not in existing]
    # Append the outputs, serialise, and take them away again: no copy of the (possibly large) model.
    g.output.extend(added)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        if not over_protobuf_limit(model):  # larger ones go to ORT through a file with external data
            return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "calib.onnx")
            # save_model moves tensors out of the proto it is given: save a copy (only for > 2 GiB models).
            big = onnx.ModelProto()
            big.CopyFrom(model)
            onnx.save_model(big, path, save_as_external_data=True, location="calib.data")
            del big
            return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    except Exception as e:
        # ORT names the first op it lacks; the custom-domain ops are the usual suspects, all named here.
        custom = sorted(
            {f"{n.domain}.{n.op_type}" for n in g.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml")}
        )
        also = f" (custom-domain ops in the model: {', '.join(custom)})" if custom else ""
        raise InputError(f"ONNX Runtime cannot load the model: {_short(e)}{also}") from e
    finally:
        for _ in added:
            del g.output[-1]


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."
