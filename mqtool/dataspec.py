"""What a `data` argument names: a data file or folder, or a Python function that produces the samples.

- `train.npz`, `data/` (a folder of `.npy`): read by `mqtool.data` without running any code.
- `loader.py:make_samples`: the function `make_samples` of that file (imported; its folder is put on `sys.path`
  while it runs, so it can import its neighbours).
- `mypkg.loader:make_samples`: the function of an importable module (the current directory comes first on
  `sys.path` while it is imported and run, as with `python -m`).

Only the last two run user code, and only when the text says so: a path that exists is always a data file.
`mqtool.data.open_data` resolves a `DataSpec` (or the same text as a plain string). This module imports neither
NumPy nor ONNX so the CLI can parse its options cheaply; its two `cli_*` callbacks let the `--data` and
`--max-samples` options hand a `DataSpec` to the commands without the commands knowing.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator

from mqtool.errors import InputError

# A few thousand samples: enough for calibration (2048 are used) and a search split, small enough to hold in
# memory for typical inputs (4096 RGB 224x224 float32 images are 2.3 GiB; mqtool.data refuses what would not fit).
DEFAULT_MAX_SAMPLES = 4096

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class DataSpec(os.PathLike):
    """A parsed `data` argument. `kind` is "file" (an `.npz` or a folder of `.npy`), "script"
    (`FILE.py:function`) or "module" (`package.module:function`). `max_samples` caps the samples used (the first
    ones, in order): None means all of a file and `DEFAULT_MAX_SAMPLES` from a function.

    `str()` gives the text as written (what messages show); `os.fspath()` the file behind it (the data file,
    the script or the module's source), so code that hashes "the data file" for a cache key keeps working."""

    def __init__(self, source: str | os.PathLike, max_samples: int | None = None):
        if isinstance(source, DataSpec):
            max_samples = source.max_samples if max_samples is None else max_samples
            source = source.source
        self.source = os.fspath(source)
        if max_samples is not None and (isinstance(max_samples, bool) or int(max_samples) < 1):
            raise InputError(f"max_samples must be a positive integer, got {max_samples!r}")
        self.max_samples = None if max_samples is None else int(max_samples)
        self.kind, self.target, self.function = _parse(self.source)
        self._file: str | None = self.target if self.kind != "module" else None

    def __str__(self) -> str:
        return self.source

    def __repr__(self) -> str:
        return f"DataSpec({self.source!r}, max_samples={self.max_samples})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DataSpec) and (self.source, self.max_samples) == (
            other.source,
            other.max_samples,
        )

    def __hash__(self) -> int:
        return hash((self.source, self.max_samples))

    def __fspath__(self) -> str:
        if self._file is None:  # finding a submodule imports its parent packages: only when asked
            with on_sys_path(os.getcwd()):
                try:
                    found = importlib.util.find_spec(self.target)
                except Exception as e:
                    raise InputError(
                        f"{self.source}: cannot find module '{self.target}' ({_short(e)})"
                    ) from e
            if found is None or not found.origin or not os.path.isfile(found.origin):
                raise InputError(f"{self.source}: no module '{self.target}' with a source file")
            self._file = found.origin
        return self._file


def _parse(source: str) -> tuple[str, str, str | None]:
    if os.path.exists(source):
        return "file", source, None
    target, sep, function = source.rpartition(":")
    if not sep or not target or not _DOTTED.fullmatch(function):
        return "file", source, None
    if target.endswith(".py"):
        return "script", target, function
    if os.path.isfile(target):  # e.g. `train.npz:x`: a data file never runs as code
        raise InputError(
            f"{source}: {target} is not a .py file; a data function is FILE.py:function or "
            "package.module:function"
        )
    if _DOTTED.fullmatch(target):
        return "module", target, function
    return "file", source, None


@contextlib.contextmanager
def on_sys_path(folder: str) -> Iterator[None]:
    """`folder` first on `sys.path` for the duration (then `sys.path` as it was)."""
    saved = list(sys.path)
    sys.path.insert(0, folder)
    try:
        yield
    finally:
        sys.path[:] = saved


def cli_data(ctx, param, value: str | None):
    """Click callback of `--data`: a `DataSpec` for a function or when `--max-samples` is given, else the text."""
    if value is None:
        return None
    max_samples = ctx.meta.get("mqtool.max_samples")
    spec = DataSpec(value, max_samples)
    return spec if spec.kind != "file" or max_samples is not None else value


def cli_max_samples(ctx, param, value: int | None) -> None:
    """Click callback of `--max-samples` (not passed to the command): attaches the cap to `--data`, whichever
    of the two click processes first."""
    if value is None:
        return
    ctx.meta["mqtool.max_samples"] = value
    if ctx.params.get("data") is not None:
        ctx.params["data"] = DataSpec(ctx.params["data"], value)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."
