"""The pass abstraction: a pass takes a model and returns `PassResult(model, modified)`.

A pass is any callable `f(model) -> PassResult`; passes with options are bound with `functools.partial`
(`partial(upgrade_opset, opset=21)`). Passes rewrite the model they are given *in place* (and may return a
new proto, as the version converter does): `run_passes` copies the caller's model once, so a pipeline never
modifies its input and never deep-copies more than once::

    model = run_passes(original, [name_nodes, fold_constants, fold_batchnorm, cleanup]).model

A pass that raises is reported with its name and the passes that ran before it (`PassError`, or the
`InputError` it raised with the pass name prepended: a model the checker accepts but a pass cannot handle is
still the model's problem).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import onnx

from mqtool.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PassResult:
    """The model after a pass (possibly the same object) and whether the pass changed anything."""

    model: onnx.ModelProto
    modified: bool


Pass = Callable[[onnx.ModelProto], PassResult]


class PassError(RuntimeError):
    """A pass failed on a model for a reason that is not the model's fault (a bug or unsupported case)."""

    def __init__(self, name: str, before: list[str], cause: BaseException):
        self.pass_name = name
        ran = ", ".join(before) if before else "none"
        super().__init__(
            f"pass '{name}' failed ({type(cause).__name__}: {cause}); passes run before it: {ran}"
        )


def pass_name(p: Callable) -> str:
    """`fold_constants`, or `upgrade_opset(opset=21)` for a partial."""
    if isinstance(p, functools.partial):
        # Long values (a policy, a ModelInfo) are cut: the name goes into one-line error messages.
        parts = [repr(a) for a in p.args] + [f"{k}={v!r}" for k, v in p.keywords.items()]
        args = ", ".join(r if len(r) <= 50 else r[:47] + "..." for r in parts)
        return f"{pass_name(p.func)}({args})"
    return getattr(p, "__name__", type(p).__name__)


def run_passes(model: onnx.ModelProto, passes: Sequence[Pass], *, copy: bool = True) -> PassResult:
    """Run `passes` in order on a copy of `model` (on `model` itself when `copy=False`).

    Returns the final model and whether any pass modified it. The caller's model is never touched when
    `copy` is true (the default): the one deep copy of the pipeline happens here.
    """
    current = onnx.ModelProto()
    if copy:
        current.CopyFrom(model)
    else:
        current = model
    modified = False
    done: list[str] = []
    for p in passes:
        name = pass_name(p)
        try:
            result = p(current)
        except InputError as e:
            raise InputError(f"{e} (in pass '{name}')") from e
        except Exception as e:
            raise PassError(name, done, e) from e
        log.debug("pass %s: %s", name, "modified" if result.modified else "unchanged")
        current = result.model
        modified |= result.modified
        done.append(name)
    return PassResult(current, modified)
