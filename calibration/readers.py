"""Calibration data sources, all turned into a stream of ONNX Runtime feeds (dict input name -> batch).

Accepted: what `mqtool.data.open_data` reads (a path to an `.npz` file or a directory of `.npy` files, or a
`FILE.py:function` / `package.module:function` spec, as text or a `mqtool.dataspec.DataSpec`), an opened
`mqtool.data.Dataset`, a dict of in-memory arrays, or any object with ONNX Runtime's `CalibrationDataReader`
protocol (`get_next()` returns a feed dict, then None; its items may be one sample or a batch, and may carry
labels, as `mqtool.data.split_item` describes). Feeds come in order, so calibration is deterministic; memory
is bounded by the batch size (a function's samples are held in memory, up to its `max_samples`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Protocol, runtime_checkable

import numpy as np
import onnx

from mqtool.data import SINGLE_INPUT, Dataset, InputSpec, model_inputs, open_data, split_item, to_input
from mqtool.dataspec import DataSpec
from mqtool.errors import InputError
from mqtool.runtime import samples_in, take_samples


@runtime_checkable
class CalibrationDataReader(Protocol):
    """ONNX Runtime's reader protocol: `get_next()` returns the next feed, or None when exhausted."""

    def get_next(self) -> dict[str, np.ndarray] | None: ...


DataSource = str | os.PathLike | DataSpec | Dataset | Mapping[str, np.ndarray] | CalibrationDataReader


def iter_feeds(
    data: DataSource, model: onnx.ModelProto, batch_size: int = 64, limit: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Feeds for `model` from `data`, in order, covering at most `limit` samples."""
    specs = model_inputs(model)
    if isinstance(data, str | os.PathLike):  # DataSpec included
        yield from open_data(data, model, limit).batches(batch_size, limit)
    elif isinstance(data, Dataset):
        yield from data.batches(batch_size, limit)
    elif isinstance(data, Mapping):
        yield from _from_arrays(data, specs, batch_size, limit)
    elif isinstance(data, CalibrationDataReader):
        yield from _from_reader(data, specs, limit)
    else:
        raise InputError(f"calibration data: unsupported source {type(data).__name__}")


def _from_arrays(
    arrays: Mapping[str, np.ndarray], specs: list[InputSpec], batch_size: int, limit: int | None
) -> Iterator[dict[str, np.ndarray]]:
    _check_names("calibration arrays", set(arrays), specs)
    # Samples lie on each input's sample axis (axis 1 of a state [layers, N, hidden]); a shared scalar
    # input is fed whole with every batch.
    counts = [samples_in(arrays[s.name], s.sample_axis) for s in specs]
    n = min((c for c in counts if c is not None), default=1)
    n = n if limit is None else min(n, limit)
    for i in range(0, n, batch_size):
        feed = {
            s.name: to_input(
                np.asarray(take_samples(np.asarray(arrays[s.name]), s.sample_axis, slice(i, i + batch_size))),
                s,
                f"calibration arrays: '{s.name}'",
                i,
            )
            for s in specs
        }
        _check_finite("calibration arrays", feed)
        yield feed


def _from_reader(
    reader: CalibrationDataReader, specs: list[InputSpec], limit: int | None
) -> Iterator[dict[str, np.ndarray]]:
    seen = index = 0
    while limit is None or seen < limit:
        item = reader.get_next()
        if item is None:
            return
        if not isinstance(item, Mapping | tuple | list) and not hasattr(item, "__array__"):
            raise InputError(
                f"calibration reader: get_next() returned {type(item).__name__}, expected a dict"
            )
        feed, _, count = split_item("calibration reader", item, specs, index)  # labels are not needed here
        if len(specs) == 1 and SINGLE_INPUT in feed and specs[0].name not in feed:
            feed[specs[0].name] = feed.pop(SINGLE_INPUT)
        _check_names("calibration reader", set(feed), specs)
        feed = {
            s.name: to_input(feed[s.name], s, f"calibration reader: input '{s.name}'", seen) for s in specs
        }
        _check_finite("calibration reader", feed)
        seen += count
        index += 1
        yield feed


def _check_names(source: str, names: set[str], specs: list[InputSpec]) -> None:
    missing = [s.name for s in specs if s.name not in names]
    if missing:
        raise InputError(f"{source}: no data for model input '{missing[0]}' (got {sorted(names)})")


def _check_finite(source: str, feed: dict[str, np.ndarray]) -> None:
    for k, v in feed.items():
        if v.size == 0:
            raise InputError(f"{source}: input '{k}' is empty")
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise InputError(f"{source}: input '{k}' contains NaN or Inf")
