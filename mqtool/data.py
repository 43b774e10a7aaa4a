"""Loading user data files (inputs + optional labels) for calibration, validation and the search.

Two layouts, both read with `allow_pickle=False`:

- `.npz`: one array per model input, named after it (or a single `x` for a one-input model), and an optional
  `y` of integer labels, one per sample.
- a directory of `.npy` files: `<input name>.npy` per input (or `x.npy`), optional `y.npy`.

Arrays are `[samples, ...]` with the trailing dims of the model input. They are streamed in batches: `.npy`
files are memory-mapped and `.npz` members are read incrementally from the zip, so memory is bounded by the
batch size, not the data set. Every problem (missing/extra arrays, wrong shape or dtype, NaN/Inf, integers
outside the input's type, empty arrays, labels of the wrong length or beyond the model's classes) is an
`InputError` naming the file and the array.

A third source is a Python function (`loader.py:make_samples` or `package.module:make_samples`, see
`mqtool.dataspec`), called without arguments. It returns an ONNX Runtime `CalibrationDataReader`, an iterable of
items, or one dict of arrays. An item is a feed dict `{input name: array}` (labels, if any, under `y`), a
`(feeds, label)` pair, or, for a one-input model, the array itself (alone or in a pair). An array with the
input's rank is a batch (first axis = samples); one with a rank less is one sample. What the function yields
is materialised once, up to `max_samples`, then checked exactly like a file (the spec stands for the file in
messages). The user's exceptions become an `InputError` naming the file, the function and the message.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import onnx

from mqtool.dataspec import DEFAULT_MAX_SAMPLES, DataSpec, on_sys_path
from mqtool.errors import InputError
from mqtool.runtime import concat_feeds, fixed_batch, sample_axis, take_samples

log = logging.getLogger(__name__)

LABELS = "y"
SINGLE_INPUT = "x"
# Materialised data may take this share of the memory available when loading starts: the search then holds
# a split copy, the teacher outputs and the model's activations besides.
MEMORY_FRACTION = 0.25

_ONNX_TO_NP = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
    onnx.TensorProto.INT8: np.int8,
    onnx.TensorProto.UINT8: np.uint8,
    onnx.TensorProto.BOOL: np.bool_,
}


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, NumPy dtype and dims (None where symbolic or unknown)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...] | None

    @property
    def sample_axis(self) -> int | None:
        """The axis that counts samples (`mqtool.runtime.sample_axis`); None for a shared scalar input."""
        return sample_axis(self.shape)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model requires, when the dim on its sample axis is a number."""
        axis = self.sample_axis
        return self.shape[axis] if axis is not None and self.shape and self.shape[axis] else None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real (non-initializer) inputs of `model`."""
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dtype = np.dtype(_ONNX_TO_NP.get(t.elem_type, np.float32))
        shape = None
        if t.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim
            )
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


class _Array:
    """One array of a data file, readable in slices of samples. Samples on axis 0 are streamed without
    loading the array whole; an array with its samples on another axis (a recurrent state `[layers, N,
    hidden]`) is read whole once, and a shared input's one value is given with every batch. `axis` is the
    model input's sample axis (`mqtool.runtime.sample_axis`), set when the array is matched to it."""

    def __init__(self, source: str, key: str, shape: tuple[int, ...], dtype: np.dtype, reader, whole):
        self.source, self.key, self.shape, self.dtype, self._reader = source, key, shape, dtype, reader
        self._whole = whole
        self.axis: int | None = 0

    @property
    def count(self) -> int | None:
        """Samples in the array (None for a shared input)."""
        if self.axis is None or len(self.shape) <= self.axis:
            return None
        return self.shape[self.axis]

    def rows(self, batch: int, limit: int) -> Iterator[np.ndarray]:
        if self.axis == 0:
            yield from self._reader(batch, limit)
            return
        whole = self._whole()
        for i in range(0, max(limit, 1), batch):
            if self.axis is None:
                yield np.asarray(whole).reshape(())
            else:
                yield np.ascontiguousarray(take_samples(whole, self.axis, slice(i, min(i + batch, limit))))


def _npy_array(path: str, key: str) -> _Array:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle: refused
        if "pickle" not in str(e):  # e.g. a truncated file: "mmap length is greater than file size"
            raise InputError(f"{path}: array '{key}' is not a readable .npy file ({_short(e)})") from e
        raise InputError(f"{path}: array '{key}' cannot be loaded without pickle ({e})") from e
    except Exception as e:
        raise InputError(f"{path}: not a readable .npy file ({e})") from e

    def reader(batch: int, limit: int) -> Iterator[np.ndarray]:
        for i in range(0, limit, batch):
            yield np.array(arr[i : min(i + batch, limit)])

    return _Array(path, key, tuple(arr.shape), arr.dtype, reader, lambda: arr)


def _npz_array(path: str, zf: zipfile.ZipFile, key: str) -> _Array:
    member = key + ".npy"
    try:
        with zf.open(member) as f:
            shape, fortran, dtype = _npy_header(f)
    except InputError:
        raise
    except Exception as e:
        raise InputError(f"{path}: array '{key}' is not a valid .npy member ({e})") from e
    if dtype.hasobject:
        raise InputError(f"{path}: array '{key}' has dtype object (needs pickle, refused)")
    if fortran:
        raise InputError(
            f"{path}: array '{key}' is Fortran-ordered; save it C-ordered (np.ascontiguousarray)"
        )
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

    def reader(batch: int, limit: int) -> Iterator[np.ndarray]:
        # Decompress sequentially: one batch of rows in memory at a time.
        with zf.open(member) as f:
            _npy_header(f)
            for i in range(0, limit, batch):
                n = min(batch, limit - i)
                try:  # a corrupt member shows only here (zip CRC checked at its end, zlib errors)
                    buf = f.read(n * row)
                except Exception as e:
                    raise InputError(f"{path}: array '{key}' is corrupt ({_short(e)})") from e
                if len(buf) != n * row:
                    raise InputError(f"{path}: array '{key}' is truncated")
                yield np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))

    def whole() -> np.ndarray:
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        with zf.open(member) as f:
            _npy_header(f)
            try:
                buf = f.read(size)
            except Exception as e:
                raise InputError(f"{path}: array '{key}' is corrupt ({_short(e)})") from e
        if len(buf) != size:
            raise InputError(f"{path}: array '{key}' is truncated")
        return np.frombuffer(buf, dtype=dtype).reshape(shape)

    return _Array(path, key, tuple(shape), dtype, reader, whole)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy version {version}")


class Dataset:
    """A validated data file: model inputs streamed in batches, labels (small) held in memory."""

    def __init__(
        self,
        path: str,
        arrays: dict[str, _Array],
        labels: np.ndarray | None,
        specs: list[InputSpec],
        max_samples: int | None = None,
    ):
        self.path = path
        self._arrays = arrays
        self.specs = specs
        self._keepalive = None
        # Samples are counted on the inputs' sample axes; a model fed only shared scalars has one sample.
        n = next((a.count for a in arrays.values() if a.count is not None), 1)
        self.num_samples = n if max_samples is None else min(n, max_samples)
        self.labels = labels if labels is None else labels[: self.num_samples]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def batches(self, batch_size: int = 64, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` samples (exactly the model's batch when it is fixed), in file order,
        over the first `limit` samples. A model with a fixed batch drops a last partial batch."""
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        fixed = fixed_batch(self.specs)
        if fixed:
            batch_size = fixed
            if n % batch_size:
                log.info(
                    "%s: dropping %d samples that do not fill a batch of %d",
                    self.path,
                    n % batch_size,
                    batch_size,
                )
                n -= n % batch_size
        iters = {s.name: self._arrays[s.name].rows(batch_size, n) for s in self.specs}
        start = 0
        while start < n:
            feed = {}
            for s in self.specs:
                rows = next(iters[s.name])
                feed[s.name] = self._convert(s, rows, start)
            yield feed
            start += batch_size

    def load(self, limit: int | None = None) -> dict[str, np.ndarray]:
        """All (or the first `limit`) samples of every input, in memory (joined on each input's sample
        axis; a shared input's one value as it is)."""
        return concat_feeds(list(self.batches(1024, limit)), self.specs)

    def _convert(self, spec: InputSpec, rows: np.ndarray, start: int) -> np.ndarray:
        arr = self._arrays[spec.name]
        return to_input(rows, spec, f"{arr.source}: array '{arr.key}'", start)


def to_input(rows: np.ndarray, spec: InputSpec, where: str, start: int = 0) -> np.ndarray:
    """`rows` (samples starting at sample `start`, on the input's sample axis; a shared input's one value)
    cast to the dtype of model input `spec`, C-ordered; an `InputError` starting with `where` for NaN/Inf in
    a float input or integers the input's type cannot hold."""
    rows = np.asarray(rows)
    axis = spec.sample_axis if rows.ndim else None
    if axis is not None and rows.ndim <= axis:
        axis = 0
    cast = rows.dtype != spec.dtype
    if cast and spec.dtype.kind in "iu" and rows.dtype.kind in "iu" and rows.size:
        # A plain cast wraps around: int64 token ids of 2**31 would become negative int32 ones.
        info, have = np.iinfo(spec.dtype), np.iinfo(rows.dtype)
        # Bounds in the data's own type, so the comparison is exact (no float64 promotion of uint64).
        lo, hi = (np.array(v, rows.dtype) for v in (max(info.min, have.min), min(info.max, have.max)))
        flat = _per_sample(rows, axis)
        out = ((flat < lo) | (flat > hi)).any(axis=1)
        if out.any():
            i = int(np.argmax(out))
            value = flat[i][(flat[i] < lo) | (flat[i] > hi)][0]
            raise InputError(
                f"{where} has value {value} at sample {start + i}, outside the {spec.dtype} range "
                f"[{info.min}, {info.max}] of model input '{spec.name}'"
            )
    # Checked after the cast: float64 data beyond the float32 range becomes Inf in it.
    with np.errstate(over="ignore"):
        rows = rows.astype(spec.dtype, order="C", copy=False)  # (ascontiguousarray makes 0-d arrays 1-d)
    if rows.dtype.kind == "f" and not np.all(np.isfinite(rows)):
        bad = start + int(np.argwhere(~_per_sample(np.isfinite(rows), axis).all(axis=1))[0][0])
        beyond = f" or values beyond the {spec.dtype} range" if cast else ""
        raise InputError(f"{where} contains NaN or Inf (sample {bad}){beyond}")
    return rows


def _per_sample(a: np.ndarray, axis: int | None) -> np.ndarray:
    """`a` as [samples, values] (one row for a shared input)."""
    if axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)


def open_data(
    path: str | os.PathLike | DataSpec,
    model: onnx.ModelProto | list[InputSpec],
    limit: int | None = None,
) -> Dataset:
    """Open and validate the data at `path` against the inputs of `model`: a data file or folder (no array is
    read whole) or a function spec, materialised here (see the module doc). `limit` says the caller needs no
    more than that many samples (a function is then not asked for more). Given a model (not bare input specs),
    labels are also checked against its number of classes."""
    source = path if isinstance(path, DataSpec) else DataSpec(path)
    specs = model_inputs(model) if isinstance(model, onnx.ModelProto) else list(model)
    classes = _num_classes(model) if isinstance(model, onnx.ModelProto) else None
    if not specs:
        raise InputError("the model has no inputs to feed")
    if source.kind != "file":
        return _from_function(source, specs, classes, limit)
    path = source.source
    if not os.path.exists(path):
        raise InputError(f"{path}: no such data file")
    if os.path.isdir(path):
        keys = {f[:-4]: os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".npy")}
        if not keys:
            raise InputError(f"{path}: directory has no .npy files (expected one per model input)")
        names = _match_names(path, list(keys), specs)
        arrays = {spec: _npy_array(keys[key], key) for spec, key in names.items()}
        labels_arr = _load_whole(keys[LABELS], LABELS) if LABELS in keys else None
        keepalive = None
    else:
        try:
            npz = np.load(path, allow_pickle=False)
        except Exception as e:
            raise InputError(f"{path}: not a readable .npz file ({_short(e)})") from e
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise InputError(f"{path}: expected an .npz archive (arrays named after the model inputs)")
        names = _match_names(path, list(npz.files), specs)
        arrays = {spec: _npz_array(path, npz.zip, key) for spec, key in names.items()}
        labels_arr = _load_whole(path, LABELS, npz) if LABELS in npz.files else None
        keepalive = npz  # the NpzFile closes its zip when collected; the batch readers still need it
    n = _check_arrays(path, arrays, specs)
    if labels_arr is not None:
        labels_arr = _check_labels(path, labels_arr, n, classes)
    ds = Dataset(path, arrays, labels_arr, specs, source.max_samples)
    ds._keepalive = keepalive
    return ds


def _num_classes(model: onnx.ModelProto) -> tuple[str, int] | None:
    """(name, classes) of the model's first output when it is [N, classes] with a fixed class count: the
    output that labels index (validation's top-1, the search's cross-entropy)."""
    if not model.graph.output:
        return None
    out = model.graph.output[0]
    t = out.type.tensor_type
    if not t.HasField("shape") or len(t.shape.dim) != 2 or not t.shape.dim[1].HasField("dim_value"):
        return None
    c = t.shape.dim[1].dim_value
    return (out.name, c) if c > 0 else None


# ------------------------------------------------------------------------------ data from a user function


def _from_function(
    spec: DataSpec, specs: list[InputSpec], classes: tuple[str, int] | None, limit: int | None
) -> Dataset:
    src = spec.source
    cap = spec.max_samples or DEFAULT_MAX_SAMPLES
    want = cap if limit is None else min(cap, limit)
    folder = os.path.dirname(os.path.abspath(spec.target)) if spec.kind == "script" else os.getcwd()
    with on_sys_path(folder):  # the function may import its neighbours when it runs, not only at import
        fn = _import_function(spec)
        try:
            result = fn()
        except (Exception, SystemExit) as e:
            raise _raised(spec, e, None) from e
        items = _UserItems(spec, result)
        try:
            parts, labels, n, more = _collect(
                spec, items, specs, want, peek=want == cap and spec.max_samples is None
            )
        finally:
            items.close()
    if n == 0:
        raise InputError(f"{src}: the function yielded no samples")
    if more:
        log.warning("%s: using the first %d samples (max_samples); the function yields more", src, cap)
    keys = _match_names(src, list(parts), specs, found="the function yields")
    arrays = {}
    axes = {s.name: s.sample_axis for s in specs}
    for name, key in keys.items():
        got, axis = parts.pop(key), axes[name]
        if len(got) > 1 and axis is not None:
            a = np.concatenate(got, axis=axis)
        else:  # one item, or a shared input (one value, checked equal in every item)
            a = got[0].copy(order="C")
        arrays[name] = _memory_array(src, key, a)
    _check_arrays(src, arrays, specs)
    y = None
    if labels is not None:
        y = _check_labels(src, np.concatenate(labels), n, classes)
    log.info("%s: %d samples%s", src, n, " with labels" if y is not None else "")
    return Dataset(src, arrays, y, specs)


def _import_function(spec: DataSpec):
    src = spec.source
    if spec.kind == "script":
        path = os.path.abspath(spec.target)
        if not os.path.isfile(path):
            raise InputError(f"{src}: no such file {spec.target}")
        # Registered under a private name (dataclasses and pickling look modules up in sys.modules).
        name = "_mqtool_data_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise InputError(f"{src}: {spec.target} cannot be imported as Python")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except (Exception, SystemExit) as e:
            del sys.modules[name]
            raise InputError(f"{src}: importing {spec.target} raised {type(e).__name__}: {_short(e)}") from e
    else:
        try:
            module = importlib.import_module(spec.target)
        except ModuleNotFoundError as e:
            if e.name and (spec.target + ".").startswith(e.name + "."):  # not a module it imports
                raise InputError(
                    f"{src}: no module named '{e.name}' (searched the current directory and sys.path)"
                ) from e
            raise InputError(f"{src}: importing {spec.target} raised ModuleNotFoundError: {_short(e)}") from e
        except (Exception, SystemExit) as e:
            raise InputError(f"{src}: importing {spec.target} raised {type(e).__name__}: {_short(e)}") from e
    fn = module
    for part in spec.function.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InputError(f"{src}: {spec.target} has no function '{spec.function}'")
    if not callable(fn):
        raise InputError(f"{src}: '{spec.function}' is a {type(fn).__name__}, not a function")
    return fn


def _raised(spec: DataSpec, e: BaseException, items: int | None) -> InputError:
    when = "" if items is None else f" after {items} item{'s' if items != 1 else ''}"
    return InputError(f"{spec.source}: the function raised {type(e).__name__}{when}: {_short(e)}")


class _UserItems:
    """The items a user function returned, one at a time; the user's exceptions become `InputError`s."""

    def __init__(self, spec: DataSpec, result):
        self.spec, self.count = spec, 0
        self._iter = None
        self._get = None
        if callable(getattr(result, "get_next", None)):  # ORT's CalibrationDataReader protocol
            self._get = result.get_next
        elif isinstance(result, Mapping):  # one dict of arrays: the whole data set as a single batch
            self._iter = iter([result])
        elif isinstance(result, Iterable) and not isinstance(result, str | bytes | np.ndarray):
            try:
                self._iter = iter(result)
            except (Exception, SystemExit) as e:
                raise _raised(spec, e, 0) from e
        else:
            raise InputError(
                f"{spec.source}: the function returned {type(result).__name__}; expected an iterable of "
                "feed dicts or (feeds, label) pairs, a CalibrationDataReader, or a dict of arrays"
            )

    def next(self):
        """The next item, or None when there are no more."""
        try:
            item = self._get() if self._get is not None else next(self._iter, None)
        except (Exception, SystemExit) as e:
            raise _raised(self.spec, e, self.count) from e
        if item is not None:
            self.count += 1
        return item

    def close(self) -> None:
        close = getattr(self._iter, "close", None)  # a generator stopped early releases its files now
        if close is not None:
            try:
                close()
            except Exception as e:  # a cleanup failure must not hide the data
                log.warning("%s: closing the iterator raised %s", self.spec.source, _short(e))


def _collect(
    spec: DataSpec, items: _UserItems, specs: list[InputSpec], want: int, peek: bool
) -> tuple[dict[str, list[np.ndarray]], list[np.ndarray] | None, int, bool]:
    """Up to `want` samples: arrays per key, labels (None without), how many, whether more were left (asked
    of the function with one more item only when `peek`)."""
    src = spec.source
    budget = _available_memory()
    budget = None if budget is None else int(budget * MEMORY_FRACTION)
    parts: dict[str, list[np.ndarray]] = {}
    labels: list[np.ndarray] | None = None
    n = nbytes = 0
    while n < want:
        item = items.next()
        if item is None:
            return parts, labels, n, False
        feeds, y, count = split_item(src, item, specs, items.count - 1)
        if not parts:
            parts = {k: [] for k in feeds}
            labels = None if y is None else []
        axes = _key_axes(specs, feeds)
        _check_consistent(src, items.count - 1, feeds, y, parts, labels, axes)
        take = min(count, want - n)
        for k, v in feeds.items():
            if axes[k] is None:  # a shared input: its one value, kept once
                if not parts[k]:
                    parts[k].append(v)
                    nbytes += v.nbytes
                continue
            v = take_samples(v, axes[k], slice(0, take))
            parts[k].append(v)
            nbytes += v.nbytes
        if labels is not None:
            labels.append(y[:take])
        n += take
        if budget is not None and nbytes > budget:
            raise InputError(
                f"{src}: the first {n} samples already take {nbytes / 2**30:.2f} GiB, more than "
                f"{MEMORY_FRACTION:.0%} of the {budget / MEMORY_FRACTION / 2**30:.1f} GiB of available memory; "
                "lower max_samples or make the samples smaller"
            )
        if take < count:
            return parts, labels, n, peek
    return parts, labels, n, peek and items.next() is not None


def _check_consistent(
    src: str,
    index: int,
    feeds: dict[str, np.ndarray],
    y: np.ndarray | None,
    parts: dict[str, list[np.ndarray]],
    labels: list | None,
    axes: dict[str, int | None],
) -> None:
    if set(feeds) != set(parts):
        raise InputError(f"{src}: item {index} has inputs {sorted(feeds)}, earlier items {sorted(parts)}")
    if (y is None) != (labels is None):
        has = "has no label" if y is None else "has a label"
        raise InputError(f"{src}: item {index} {has} and earlier items do not agree (label all or none)")
    for k, v in feeds.items():
        if not parts[k]:
            continue
        first = parts[k][0]
        if axes[k] is None:
            if not np.array_equal(v, first):
                raise InputError(
                    f"{src}: item {index}: shared input '{k}' is {v.tolist()}, earlier items gave "
                    f"{first.tolist()} (a scalar input takes one value for all samples)"
                )
            continue
        got, had = _sample_shape(v, axes[k]), _sample_shape(first, axes[k])
        if got != had:
            raise InputError(
                f"{src}: item {index}: '{k}' has sample shape {got}, earlier items {had} (all samples share "
                "one shape)"
            )


def _sample_shape(v: np.ndarray, axis: int) -> list[int]:
    """The shape of one sample of `v` (its shape without the sample axis)."""
    return [d for i, d in enumerate(v.shape) if i != axis]


def _key_axes(specs: list[InputSpec], keys) -> dict[str, int | None]:
    """Each key's sample axis: its model input's (`x` standing for a one-input model's), 0 when unknown."""
    by_name = {s.name: s for s in specs}
    single = specs[0] if len(specs) == 1 else None
    out = {}
    for k in keys:
        s = by_name.get(k, single if k == SINGLE_INPUT else None)
        out[k] = 0 if s is None else s.sample_axis
    return out


def split_item(
    source: str, item, specs: list[InputSpec], index: int = 0
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
    """One item of a user's data (a feed dict, a `(feeds, label)` pair, or an input's array for a one-input
    model) as (key -> array with a sample axis, labels [count] or None, count). An array with the input's
    rank is a batch; one with a rank less is one sample and gets the axis (the input's sample axis,
    `mqtool.runtime.sample_axis`: axis 1 of a state `[layers, N, hidden]`). A shared scalar input is one
    value (a 0-d array, a number). Keys are as given (a one-input model's may be `x`); labels come from
    the pair or a `y` key."""
    where = f"{source}: item {index}"
    label = None
    if (
        isinstance(item, tuple | list)
        and len(item) == 2
        and (isinstance(item[0], Mapping) or (len(specs) == 1 and _is_array(item[0])))
    ):
        item, label = item
    if _is_array(item):
        if len(specs) != 1:
            raise InputError(f"{where} is an array; a model with {len(specs)} inputs needs a dict of them")
        item = {specs[0].name: item}
    if not isinstance(item, Mapping):
        raise InputError(
            f"{where} is a {type(item).__name__}; expected a dict of input arrays or a (dict, label) pair"
        )
    inputs = {s.name for s in specs}
    feeds = {}
    for k, v in item.items():
        if k == LABELS and k not in inputs:
            if label is not None:
                raise InputError(f"{where} has labels twice: a '{LABELS}' key and the pair's second element")
            label = v
            continue
        try:
            feeds[k] = np.asarray(v)
        except Exception as e:
            raise InputError(f"{where}: '{k}' is not an array ({_short(e)})") from e
    by_name = {s.name: s for s in specs}
    single = specs[0] if len(specs) == 1 else None
    counts = {}
    for k, v in feeds.items():
        s = by_name.get(k, single if k == SINGLE_INPUT else None)
        axis = 0 if s is None else s.sample_axis
        if s is not None and axis is None:
            if v.size != 1:
                raise InputError(
                    f"{where}: '{k}' has shape {list(v.shape)}; model input '{s.name}' is a scalar shared by "
                    "all samples: give one value"
                )
            feeds[k] = v.reshape(())
            continue
        if s is not None and s.shape is not None:
            rank = len(s.shape)
            if v.ndim == rank - 1:
                v = feeds[k] = np.expand_dims(v, axis)  # one sample
            elif v.ndim != rank:
                raise InputError(
                    f"{where}: '{k}' has shape {list(v.shape)}; model input '{s.name}' takes a batch of rank "
                    f"{rank} or one sample of rank {rank - 1}"
                )
        if v.ndim == 0:
            raise InputError(f"{where}: '{k}' is a scalar; an input needs at least a sample axis")
        counts[k] = v.shape[axis if v.ndim > axis else 0]
    if len(set(counts.values())) > 1:
        each = ", ".join(f"'{k}' {c}" for k, c in counts.items())
        raise InputError(f"{where}: inputs have different numbers of samples ({each})")
    count = next(iter(counts.values()), 0)
    if label is not None:
        try:
            y = np.asarray(label)
        except Exception as e:
            raise InputError(f"{where}: label '{LABELS}' is not an array ({_short(e)})") from e
        y = y.reshape(1) if y.ndim == 0 else y
        y = y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y
        if y.ndim != 1 or len(y) != count:
            raise InputError(f"{where}: label '{LABELS}' has shape {list(y.shape)} for {count} samples")
        label = y
    return feeds, label, count


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or (hasattr(v, "__array__") and not isinstance(v, Mapping))


def _memory_array(source: str, key: str, a: np.ndarray) -> _Array:
    def reader(batch: int, limit: int) -> Iterator[np.ndarray]:
        for i in range(0, limit, batch):
            yield a[i : min(i + batch, limit)]

    return _Array(source, key, tuple(a.shape), a.dtype, reader, lambda: a)


def _available_memory() -> int | None:
    """Bytes of memory this process can still take: MemAvailable, lowered to the cgroup's headroom when a
    container limits it; None where neither is known."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                room = int(limit) - int(f.read().strip())
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


# ------------------------------------------------------------------------------------------ checks


def _load_whole(path: str, key: str, npz=None) -> np.ndarray:
    try:
        return npz[key] if npz is not None else np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path}: array '{key}' cannot be loaded without pickle ({_short(e)})") from e
    except Exception as e:
        raise InputError(f"{path}: array '{key}' is unreadable ({_short(e)})") from e


def load_labelled(path: str | os.PathLike | DataSpec, model: onnx.ModelProto, limit: int | None = None):
    """(inputs in memory, labels or None): the whole (or first `limit` samples of the) data."""
    ds = open_data(path, model, limit)
    labels = ds.labels if ds.labels is None or limit is None else ds.labels[:limit]
    return ds.load(limit), labels


def _match_names(
    path: str, keys: list[str], specs: list[InputSpec], found: str = "file has"
) -> dict[str, str]:
    """Model input name -> array key in the file."""
    arrays = [k for k in keys if k != LABELS]
    wanted = [s.name for s in specs]
    if len(specs) == 1 and wanted[0] not in arrays and SINGLE_INPUT in arrays:
        mapping = {wanted[0]: SINGLE_INPUT}
    else:
        missing = [w for w in wanted if w not in arrays]
        if missing:
            raise InputError(
                f"{path}: no array for model input '{missing[0]}' ({found} {sorted(arrays)}; expected "
                f"{wanted}{' or x' if len(specs) == 1 else ''}, plus optional y)"
            )
        mapping = {w: w for w in wanted}
    extra = sorted(set(arrays) - set(mapping.values()))
    if extra:
        raise InputError(f"{path}: array '{extra[0]}' is not a model input (inputs: {wanted}, labels: y)")
    return mapping


def _check_arrays(path: str, arrays: dict[str, _Array], specs: list[InputSpec]) -> int:
    """Check every array against its model input and set its sample axis; the number of samples."""
    counts: dict[str, tuple[int, int]] = {}
    for s in specs:
        a = arrays[s.name]
        where = f"{path}: array '{a.key}'"
        axis = a.axis = s.sample_axis
        if axis is None:
            if int(np.prod(a.shape)) != 1:
                raise InputError(
                    f"{where} has shape {list(a.shape)}; model input '{s.name}' is a scalar shared by all "
                    "samples: give one value (a 0-d array)"
                )
        elif len(a.shape) == 0:
            raise InputError(
                f"{where} is a scalar; model input '{s.name}' takes samples on axis {axis} (shape "
                f"{_dims(s.shape)})"
            )
        elif s.shape is not None and len(a.shape) != len(s.shape):
            raise InputError(
                f"{where} has shape {list(a.shape)}; model input '{s.name}' has rank {len(s.shape)}"
            )
        elif a.shape[axis] == 0:
            raise InputError(f"{where} is empty (shape {list(a.shape)})")
        elif s.shape is not None:
            for i, (got, want) in enumerate(zip(a.shape, s.shape)):
                if i != axis and want is not None and got != want:
                    raise InputError(
                        f"{where} has shape {list(a.shape)}, model input '{s.name}' wants {_dims(s.shape, axis)}"
                    )
        if not _compatible(a.dtype, s.dtype):
            raise InputError(f"{where} has dtype {a.dtype}; model input '{s.name}' is {s.dtype}")
        if axis is not None:
            counts[a.key] = (a.shape[axis], axis)
    if len({n for n, _ in counts.values()}) > 1:
        each = ", ".join(f"'{k}' {n}" + (f" (axis {ax})" if ax else "") for k, (n, ax) in counts.items())
        raise InputError(f"{path}: arrays have different numbers of samples ({each})")
    return next((n for n, _ in counts.values()), 1)


def _dims(shape: tuple[int | None, ...] | None, axis: int | None = 0) -> list:
    """A model input's dims for a message: N on the sample axis and where free."""
    if shape is None:
        return []
    return ["N" if i == axis or d is None else d for i, d in enumerate(shape)]


def _compatible(got: np.dtype, want: np.dtype) -> bool:
    # float64 data for a float32 input is fine (NumPy's default); integers for a float input are not: an
    # uint8 image fed as 0..255 to a model expecting 0..1 is a silent accuracy bug.
    if want.kind == "f":
        return got.kind == "f"
    if want.kind in "iu":
        return got.kind in "iu" and np.can_cast(got, want, casting="same_kind")
    return got == want


def _check_labels(path: str, y: np.ndarray, n: int, classes: tuple[str, int] | None = None) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise InputError(
            f"{path}: array 'y' must be integer class labels of shape [N], got {y.dtype} {list(y.shape)}"
        )
    if len(y) != n:
        raise InputError(f"{path}: array 'y' has {len(y)} labels for {n} samples")
    bad = np.flatnonzero((y < 0) | (y > np.iinfo(np.int64).max))  # class indices; uint64 must fit int64
    if bad.size:
        raise InputError(
            f"{path}: array 'y' has label {y[bad[0]]} at sample {bad[0]}; labels are class indices >= 0"
        )
    if classes is not None:
        output, c = classes
        bad = np.flatnonzero(y >= c)
        if bad.size:
            raise InputError(
                f"{path}: array 'y' has label {y[bad[0]]} at sample {bad[0]}, but the model's output "
                f"'{output}' has {c} classes (labels 0..{c - 1})"
            )
    return y.astype(np.int64)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
