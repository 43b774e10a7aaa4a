"""Loading user data files (inputs + optional labels) for calibration, validation and the search.

Two layouts, both read with `allow_pickle=False`:

- `.npz`: one array per model input, named after it (or a single `x` for a one-input model), and an optional
  `y` of integer labels, one per sample.
- a directory of `.npy` files: `<input name>.npy` per input (or `x.npy`), optional `y.npy`.

Arrays are `[samples, ...]` with the trailing dims of the model input. They are streamed in batches: `.npy`
files are memory-mapped and `.npz` members are read incrementally from the zip, so memory is bounded by the
batch size, not the data set. Every problem (missing/extra arrays, wrong shape or dtype, NaN/Inf, empty
arrays, labels of the wrong length) is an `InputError` naming the file and the array.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from mqtool.errors import InputError

log = logging.getLogger(__name__)

LABELS = "y"
SINGLE_INPUT = "x"

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
    def fixed_batch(self) -> int | None:
        """The batch size the model requires, when its first dim is a number."""
        return self.shape[0] if self.shape and self.shape[0] else None


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
    """One array of a data file, readable in row slices without loading it whole."""

    def __init__(self, source: str, key: str, shape: tuple[int, ...], dtype: np.dtype, reader):
        self.source, self.key, self.shape, self.dtype, self._reader = source, key, shape, dtype, reader

    def rows(self, batch: int, limit: int) -> Iterator[np.ndarray]:
        yield from self._reader(batch, limit)


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

    return _Array(path, key, tuple(arr.shape), arr.dtype, reader)


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

    return _Array(path, key, tuple(shape), dtype, reader)


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
        self, path: str, arrays: dict[str, _Array], labels: np.ndarray | None, specs: list[InputSpec]
    ):
        self.path = path
        self._arrays = arrays
        self.labels = labels
        self.specs = specs
        self._keepalive = None
        self.num_samples = next(iter(arrays.values())).shape[0]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def batches(self, batch_size: int = 64, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of at most `batch_size` samples (exactly the model's batch when it is fixed), in file order,
        over the first `limit` samples. A model with a fixed batch drops a last partial batch."""
        n = self.num_samples if limit is None else min(limit, self.num_samples)
        fixed = {s.fixed_batch for s in self.specs} - {None}
        if fixed:
            batch_size = fixed.pop()
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
        """All (or the first `limit`) samples of every input, in memory."""
        parts: dict[str, list[np.ndarray]] = {s.name: [] for s in self.specs}
        for feed in self.batches(1024, limit):
            for k, v in feed.items():
                parts[k].append(v)
        return {k: np.concatenate(v) for k, v in parts.items()}

    def _convert(self, spec: InputSpec, rows: np.ndarray, start: int) -> np.ndarray:
        arr = self._arrays[spec.name]
        # Checked after the cast: float64 data beyond the float32 range becomes Inf in it.
        cast = rows.dtype != spec.dtype
        with np.errstate(over="ignore"):
            rows = np.ascontiguousarray(rows, dtype=spec.dtype)
        if rows.dtype.kind == "f" and not np.all(np.isfinite(rows)):
            bad = start + int(np.argwhere(~np.isfinite(rows).reshape(len(rows), -1).all(axis=1))[0][0])
            beyond = f" or values beyond the {spec.dtype} range" if cast else ""
            raise InputError(f"{arr.source}: array '{arr.key}' contains NaN or Inf (sample {bad}){beyond}")
        return rows


def open_data(path: str | os.PathLike, model: onnx.ModelProto | list[InputSpec]) -> Dataset:
    """Open and validate the data file at `path` against the inputs of `model` (no array is read whole)."""
    path = os.fspath(path)
    specs = model_inputs(model) if isinstance(model, onnx.ModelProto) else list(model)
    if not specs:
        raise InputError("the model has no inputs to feed")
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
    _check_arrays(path, arrays, specs)
    n = next(iter(arrays.values())).shape[0]
    if labels_arr is not None:
        labels_arr = _check_labels(path, labels_arr, n)
    ds = Dataset(path, arrays, labels_arr, specs)
    ds._keepalive = keepalive
    return ds


def _load_whole(path: str, key: str, npz=None) -> np.ndarray:
    try:
        return npz[key] if npz is not None else np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path}: array '{key}' cannot be loaded without pickle ({_short(e)})") from e
    except Exception as e:
        raise InputError(f"{path}: array '{key}' is unreadable ({_short(e)})") from e


def load_labelled(path: str | os.PathLike, model: onnx.ModelProto, limit: int | None = None):
    """(inputs in memory, labels or None): the whole (or first `limit` samples of the) data file."""
    ds = open_data(path, model)
    labels = ds.labels if ds.labels is None or limit is None else ds.labels[:limit]
    return ds.load(limit), labels


def _match_names(path: str, keys: list[str], specs: list[InputSpec]) -> dict[str, str]:
    """Model input name -> array key in the file."""
    arrays = [k for k in keys if k != LABELS]
    wanted = [s.name for s in specs]
    if len(specs) == 1 and wanted[0] not in arrays and SINGLE_INPUT in arrays:
        mapping = {wanted[0]: SINGLE_INPUT}
    else:
        missing = [w for w in wanted if w not in arrays]
        if missing:
            raise InputError(
                f"{path}: no array for model input '{missing[0]}' (file has {sorted(arrays)}; expected "
                f"{wanted}{' or x' if len(specs) == 1 else ''}, plus optional y)"
            )
        mapping = {w: w for w in wanted}
    extra = sorted(set(arrays) - set(mapping.values()))
    if extra:
        raise InputError(f"{path}: array '{extra[0]}' is not a model input (inputs: {wanted}, labels: y)")
    return mapping


def _check_arrays(path: str, arrays: dict[str, _Array], specs: list[InputSpec]) -> None:
    counts: dict[str, int] = {}
    for s in specs:
        a = arrays[s.name]
        where = f"{path}: array '{a.key}'"
        if len(a.shape) == 0 or a.shape[0] == 0:
            raise InputError(f"{where} is empty (shape {list(a.shape)})")
        if s.shape is not None:
            if len(a.shape) != len(s.shape):
                raise InputError(
                    f"{where} has shape {list(a.shape)}; model input '{s.name}' has rank {len(s.shape)}"
                )
            for got, want in zip(a.shape[1:], s.shape[1:]):
                if want is not None and got != want:
                    shape = ["N" if d is None else d for d in s.shape]
                    raise InputError(
                        f"{where} has shape {list(a.shape)}, model input '{s.name}' wants {shape}"
                    )
        if not _compatible(a.dtype, s.dtype):
            raise InputError(f"{where} has dtype {a.dtype}; model input '{s.name}' is {s.dtype}")
        counts[a.key] = a.shape[0]
    if len(set(counts.values())) > 1:
        each = ", ".join(f"'{k}' {n}" for k, n in counts.items())
        raise InputError(f"{path}: arrays have different numbers of samples ({each})")


def _compatible(got: np.dtype, want: np.dtype) -> bool:
    # float64 data for a float32 input is fine (NumPy's default); integers for a float input are not: an
    # uint8 image fed as 0..255 to a model expecting 0..1 is a silent accuracy bug.
    if want.kind == "f":
        return got.kind == "f"
    if want.kind in "iu":
        return got.kind in "iu" and np.can_cast(got, want, casting="same_kind")
    return got == want


def _check_labels(path: str, y: np.ndarray, n: int) -> np.ndarray:
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
    return y.astype(np.int64)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
