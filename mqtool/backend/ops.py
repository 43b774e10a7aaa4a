"""The op registry of the PyTorch backend: ONNX op type -> a small torch function.

Adding an op is one decorated factory in this file::

    @register("Relu")
    def _relu(node: Node) -> OpFn:
        return F.relu

A factory runs once, when the graph is converted: it reads the node's attributes (`node.attr`), opset
(`node.opset`) and the values of constant inputs (`node.const(i)`, NumPy or None) and returns the function
that runs on every forward. That function receives one argument per ONNX input (None for an omitted
optional input; constant inputs arrive as tensors too, so a function may use or ignore them) and returns
a tensor, or a tuple for multi-output ops. Factories must not capture tensors (they would not follow
`module.to(device)`); capture Python numbers and lists. A factory raises `node.error(...)` for an attribute
combination it does not implement; the converter reports all of them at once.

Semantics follow the ONNX spec and, where the spec is loose (ConvTranspose padding with `output_shape`,
nearest rounding of Resize before opset 11), ONNX Runtime's CPU kernels, which is what the emitted models
run on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import Tensor

from mqtool.errors import InputError
from mqtool.model import constant_attr_value

OpFn = Callable[..., Any]
Factory = Callable[["Node"], OpFn]

REGISTRY: dict[str, Factory] = {}


def register(*op_types: str) -> Callable[[Factory], Factory]:
    """Register `factory` for each ONNX op type (default domain) in `op_types`."""

    def deco(factory: Factory) -> Factory:
        for op in op_types:
            if op in REGISTRY:
                raise ValueError(f"op {op} registered twice")
            REGISTRY[op] = factory
        return factory

    return deco


# Control-flow ops: `mqtool.backend.graph` runs them itself (their bodies become step lists).
CONTROL_FLOW_OPS = ("If", "Loop")


def supported_ops() -> list[str]:
    """Sorted ONNX op types the backend runs."""
    return sorted([*REGISTRY, *CONTROL_FLOW_OPS])


def supported_ops_markdown(width: int = 110) -> str:
    """The op list of docs/backend.md's "Supported ops" section (`python -m mqtool.backend` prints it)."""
    lines, line = [], ""
    for op in supported_ops():
        item = f"`{op}`,"
        if line and len(line) + 1 + len(item) > width:
            lines.append(line)
            line = item
        else:
            line = f"{line} {item}" if line else item
    lines.append(line.rstrip(","))
    return f"{len(supported_ops())} op types (default ONNX domain):\n\n" + "\n".join(lines) + "\n"


class Node:
    """What an op factory may look at: attributes, opset, constant inputs, arity."""

    def __init__(self, proto: onnx.NodeProto, name: str, opset: int, consts: dict[str, np.ndarray]):
        self.proto = proto
        self.name = name
        self.op_type = proto.op_type
        self.opset = opset
        self.inputs = list(proto.input)
        self.outputs = list(proto.output)
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
        self._consts = consts

    def attr(self, key: str, default: Any = None) -> Any:
        value = self.attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    def has(self, i: int) -> bool:
        """Whether optional input `i` is given."""
        return i < len(self.inputs) and self.inputs[i] != ""

    def const(self, i: int) -> np.ndarray | None:
        """The value of input `i` when it is known at conversion time, else None."""
        return self._consts.get(self.inputs[i]) if self.has(i) else None

    def known(self, i: int) -> bool:
        """Input `i` is omitted or constant (its value is settled at conversion time)."""
        return not self.has(i) or self.inputs[i] in self._consts

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def error(self, message: str) -> InputError:
        return InputError(f"node '{self.name}' ({self.op_type}): {message}")


def _ints(v: Tensor | np.ndarray | Sequence[int] | None) -> list[int] | None:
    if v is None:
        return None
    if isinstance(v, Tensor):
        return [int(i) for i in v.reshape(-1).tolist()]
    return [int(i) for i in np.asarray(v).reshape(-1)]


def _floats(v: Tensor | np.ndarray) -> list[float]:
    if isinstance(v, Tensor):
        return [float(i) for i in v.reshape(-1).tolist()]
    return [float(i) for i in np.asarray(v).reshape(-1)]


def _ints_input(
    node: Node, i: int, attr: str | None = None, since: int = 0
) -> Callable[[Tensor | None], Any]:
    """Reader of an int-list parameter that moved from attribute `attr` to input `i` at opset `since`.

    Returns `get(runtime_value) -> list[int] | None`; constant values are read once, here.
    """
    if attr is not None and node.opset < since:
        fixed = node.attr(attr)
        fixed = None if fixed is None else [int(v) for v in fixed]
        return lambda _v: fixed
    if node.known(i):
        fixed = _ints(node.const(i))
        return lambda _v: fixed
    return _ints


# ---------------------------------------------------------------------------------------------- dtypes

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def torch_dtype(node: Node, onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise node.error(f"tensor type {onnx.TensorProto.DataType.Name(onnx_type)} is not supported")
    return _DTYPES[onnx_type]


# ----------------------------------------------------------------------------------- elementwise ops


def _unary(fn: Callable[[Tensor], Tensor]) -> Factory:
    return lambda node: fn


class _Sqrt(torch.autograd.Function):
    """torch.sqrt with gradient 0 where the output is 0 (torch's is inf there, and inf x 0 is NaN further
    back). A quantized activation can be exactly 0 in front of a Sqrt (silero's STFT magnitude
    sqrt(re^2 + im^2)): training through it made MetaQuantNet's weights NaN."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad / (2 * y), torch.zeros_like(grad))


def _sqrt(x: Tensor) -> Tensor:
    return _Sqrt.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.sqrt(x)


for _op, _fn in {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "Log": torch.log,
    "Sqrt": _sqrt,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Erf": torch.erf,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # half to even, as ONNX
    "Reciprocal": torch.reciprocal,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "HardSwish": F.hardswish,
    "Mish": F.mish,
}.items():
    register(_op)(_unary(_fn))


@register("Identity")
def _identity(node: Node) -> OpFn:
    return lambda x: x


@register("Dropout")
def _dropout(node: Node) -> OpFn:
    # Inference semantics always (as ONNX Runtime): the module stays deterministic under .train(), which
    # quantization-aware fine-tuning relies on.
    if node.n_outputs > 1:
        return lambda x, *_: (x, torch.ones_like(x, dtype=torch.bool))
    return lambda x, *_: x


@register("LeakyRelu")
def _leaky_relu(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 0.01))
    return lambda x: F.leaky_relu(x, alpha)


@register("Elu")
def _elu(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.elu(x, alpha)


@register("Selu")
def _selu(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 1.67326319217681884765625))
    gamma = float(node.attr("gamma", 1.05070102214813232421875))
    return lambda x: gamma * torch.where(x > 0, x, alpha * torch.expm1(x))


@register("Celu")
def _celu(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: F.celu(x, alpha)


@register("ThresholdedRelu")
def _thresholded_relu(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 1.0))
    return lambda x: torch.where(x > alpha, x, torch.zeros_like(x))


@register("HardSigmoid")
def _hard_sigmoid(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 0.2))
    beta = float(node.attr("beta", 0.5))
    return lambda x: torch.clamp(x * alpha + beta, 0.0, 1.0)


@register("PRelu")
def _prelu(node: Node) -> OpFn:
    return lambda x, slope: torch.where(x < 0, x * slope, x)


@register("Gelu")
def _gelu(node: Node) -> OpFn:
    approximate = node.attr("approximate", "none")
    return lambda x: F.gelu(x, approximate=approximate)


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Factory:
    return lambda node: fn


for _op, _fn in {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "LessOrEqual": torch.le,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    register(_op)(_binary(_fn))


@register("Div")
def _div(node: Node) -> OpFn:
    def div(a: Tensor, b: Tensor) -> Tensor:
        if a.is_floating_point():
            return a / b
        return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates (C semantics)

    return div


@register("Mod")
def _mod(node: Node) -> OpFn:
    return torch.fmod if node.attr("fmod", 0) else torch.remainder


@register("Pow")
def _pow(node: Node) -> OpFn:
    def pow_(a: Tensor, b: Tensor) -> Tensor:
        y = torch.pow(a, b)
        return y if y.dtype == a.dtype else y.to(a.dtype)  # ONNX: the result has the base's type

    return pow_


@register("Sum")
def _sum(node: Node) -> OpFn:
    return lambda *xs: functools.reduce(torch.add, xs)


@register("Mean")
def _mean(node: Node) -> OpFn:
    return lambda *xs: functools.reduce(torch.add, xs) / len(xs)


@register("Max")
def _max(node: Node) -> OpFn:
    return lambda *xs: functools.reduce(torch.maximum, xs)


@register("Min")
def _min(node: Node) -> OpFn:
    return lambda *xs: functools.reduce(torch.minimum, xs)


@register("Where")
def _where(node: Node) -> OpFn:
    return torch.where


@register("Clip")
def _clip(node: Node) -> OpFn:
    def clamp_fn(lo, hi):
        if lo is None and hi is None:
            return lambda x, *_: x
        return lambda x, *_: torch.clamp(x, lo, hi)

    def bound(v):
        if v is None:
            return None
        return float(v) if np.asarray(v).dtype.kind == "f" else int(v)

    if node.opset < 11:
        return clamp_fn(bound(node.attr("min")), bound(node.attr("max")))
    if node.known(1) and node.known(2):
        # Constant bounds become Python numbers: one clamp kernel, as nn.ReLU6.
        return clamp_fn(bound(node.const(1)), bound(node.const(2)))
    return lambda x, lo=None, hi=None: x if lo is None and hi is None else torch.clamp(x, lo, hi)


@register("Cast")
def _cast(node: Node) -> OpFn:
    dtype = torch_dtype(node, node.attr("to"))
    return lambda x: x.to(dtype)


@register("CastLike")
def _cast_like(node: Node) -> OpFn:
    return lambda x, like: x.to(like.dtype)


# ---------------------------------------------------------------------------------- linear algebra


@register("MatMul")
def _matmul(node: Node) -> OpFn:
    return torch.matmul


@register("Gemm")
def _gemm(node: Node) -> OpFn:
    alpha = float(node.attr("alpha", 1.0))
    beta = float(node.attr("beta", 1.0))
    trans_a = bool(node.attr("transA", 0))
    trans_b = bool(node.attr("transB", 0))

    if not trans_a and trans_b and alpha == 1.0 and beta == 1.0:
        return lambda a, b, c=None: F.linear(a, b, c)  # the nn.Linear case: one addmm

    def gemm(a: Tensor, b: Tensor, c: Tensor | None = None) -> Tensor:
        if trans_a:
            a = a.t()
        if trans_b:
            b = b.t()
        if c is None or beta == 0.0:
            y = torch.mm(a, b)
            return y if alpha == 1.0 else y * alpha
        return torch.addmm(c, a, b, beta=beta, alpha=alpha)

    return gemm


@register("Einsum")
def _einsum(node: Node) -> OpFn:
    equation = node.attr("equation")
    return lambda *xs: torch.einsum(equation, *xs)


# ------------------------------------------------------------------------------------- recurrent ops

# Activation functions of LSTM/GRU/RNN by ONNX name: (how many of activation_alpha / activation_beta it
# reads, default alpha, default beta, builder). The values are consumed in the order of the activation list.
_RNN_ACTIVATIONS: dict[str, tuple[int, int, float, float, Callable[[float, float], Callable]]] = {
    "Sigmoid": (0, 0, 0.0, 0.0, lambda a, b: torch.sigmoid),
    "Tanh": (0, 0, 0.0, 0.0, lambda a, b: torch.tanh),
    "Relu": (0, 0, 0.0, 0.0, lambda a, b: torch.relu),
    "Softsign": (0, 0, 0.0, 0.0, lambda a, b: F.softsign),
    "Softplus": (0, 0, 0.0, 0.0, lambda a, b: F.softplus),
    "LeakyRelu": (1, 0, 0.01, 0.0, lambda a, b: lambda x: F.leaky_relu(x, a)),
    "ThresholdedRelu": (1, 0, 1.0, 0.0, lambda a, b: lambda x: torch.where(x > a, x, torch.zeros_like(x))),
    "Elu": (1, 0, 1.0, 0.0, lambda a, b: lambda x: F.elu(x, a)),
    "HardSigmoid": (1, 1, 0.2, 0.5, lambda a, b: lambda x: torch.clamp(x * a + b, 0.0, 1.0)),
    "ScaledTanh": (1, 1, 1.0, 1.0, lambda a, b: lambda x: a * torch.tanh(b * x)),
    "Affine": (1, 1, 1.0, 0.0, lambda a, b: lambda x: a * x + b),
}
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_RNN_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}


def _rnn_activations(node: Node, directions: int) -> list[list[Callable]]:
    """The activation functions of each direction, parameters read as ONNX Runtime reads them."""
    per = len(_RNN_DEFAULT_ACTS[node.op_type])
    names = node.attr("activations")
    names = [n.decode() if isinstance(n, bytes) else n for n in names] if names else None
    if names is None:
        names = _RNN_DEFAULT_ACTS[node.op_type] * directions
    if len(names) != per * directions:
        raise node.error(f"{len(names)} activations given, expected {per} per direction ({per * directions})")
    alphas = list(node.attr("activation_alpha") or [])
    betas = list(node.attr("activation_beta") or [])
    fns = []
    for name in names:
        key = next((k for k in _RNN_ACTIVATIONS if k.lower() == name.lower()), None)
        if key is None:
            raise node.error(f"activation {name!r} is not supported")
        n_alpha, n_beta, alpha, beta, build = _RNN_ACTIVATIONS[key]
        if n_alpha and alphas:
            alpha = float(alphas.pop(0))
        if n_beta and betas:
            beta = float(betas.pop(0))
        fns.append(build(alpha, beta))
    return [fns[d * per : (d + 1) * per] for d in range(directions)]


@register("LSTM", "GRU", "RNN")
def _recurrent(node: Node) -> OpFn:
    """ONNX's LSTM, GRU and RNN: one matmul projects the inputs of every time step, a loop over time runs
    the recurrence. Forward, reverse and bidirectional; optional bias, initial states, peepholes and
    `sequence_lens` (steps past a sequence's length give zeros in Y and leave its state alone, as ONNX
    Runtime does); layout 0 and 1."""
    kind = node.op_type
    direction = node.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        raise node.error(f"unknown direction {direction!r}")
    directions = 2 if direction == "bidirectional" else 1
    acts = _rnn_activations(node, directions)
    layout = int(node.attr("layout", 0))
    clip = node.attr("clip")
    clip = None if clip is None else float(clip)
    input_forget = bool(node.attr("input_forget", 0))
    linear_before_reset = bool(node.attr("linear_before_reset", 0))
    gates = _RNN_GATES[kind]
    n_out = node.n_outputs
    reverse = [direction == "reverse"] if directions == 1 else [False, True]

    def clipped(x: Tensor) -> Tensor:
        return x if clip is None else torch.clamp(x, -clip, clip)

    def run(
        x: Tensor,
        w: Tensor,
        r: Tensor,
        b: Tensor | None = None,
        lens: Tensor | None = None,
        h0: Tensor | None = None,
        c0: Tensor | None = None,
        p: Tensor | None = None,
    ) -> Any:
        if layout:
            x = x.transpose(0, 1)
            h0 = None if h0 is None else h0.transpose(0, 1)
            c0 = None if c0 is None else c0.transpose(0, 1)
        steps, batch = x.shape[0], x.shape[1]
        hidden = r.shape[-1]
        masks = None
        if lens is not None and bool((lens != steps).any()):
            t = torch.arange(steps, device=x.device).reshape(steps, 1, 1)
            masks = t < lens.to(x.device).reshape(1, -1, 1)
        ys, hs, cs = [], [], []
        for d in range(directions):
            wd, rd = w[d], r[d]
            proj = torch.matmul(x, wd.t())  # every time step at once: [steps, batch, gates * hidden]
            rb = None
            if b is not None:
                wb, rb = b[d, : gates * hidden], b[d, gates * hidden :]
                if kind == "GRU":
                    # The recurrent bias of the candidate stays inside the reset gate's product.
                    proj = proj + wb + torch.cat([rb[: 2 * hidden], torch.zeros_like(rb[2 * hidden :])])
                else:
                    proj = proj + (wb + rb)
            h = h0[d] if h0 is not None else x.new_zeros(batch, hidden)
            c = None
            if kind == "LSTM":
                c = c0[d] if c0 is not None else x.new_zeros(batch, hidden)
            order = range(steps - 1, -1, -1) if reverse[d] else range(steps)
            out: list[Tensor | None] = [None] * steps
            f_act, *g = acts[d]
            for t in order:
                if kind == "LSTM":
                    z = torch.addmm(proj[t], h, rd.t())
                    if p is None and not input_forget:
                        # One activation call for the three sigmoid gates (i, o, f are adjacent).
                        i, o, f = f_act(clipped(z[:, : 3 * hidden])).chunk(3, -1)
                        c_new = f * c + i * g[0](clipped(z[:, 3 * hidden :]))
                        h_new = o * g[1](c_new)
                        if masks is not None:
                            m = masks[t]
                            h, c = torch.where(m, h_new, h), torch.where(m, c_new, c)
                            out[t] = torch.where(m, h_new, torch.zeros_like(h_new))
                        else:
                            h, c = h_new, c_new
                            out[t] = h
                        continue
                    i, o, f, cand = z.chunk(4, -1)
                    if p is not None:
                        i = i + p[d, :hidden] * c
                        f = f + p[d, 2 * hidden :] * c
                    i = f_act(clipped(i))
                    f = 1 - i if input_forget else f_act(clipped(f))
                    c_new = f * c + i * g[0](clipped(cand))
                    if p is not None:
                        o = o + p[d, hidden : 2 * hidden] * c_new
                    h_new = f_act(clipped(o)) * g[1](c_new)
                elif kind == "GRU":
                    xz, xr, xh = proj[t].chunk(3, -1)
                    zr = torch.matmul(h, rd[: 2 * hidden].t())
                    zg = f_act(clipped(xz + zr[:, :hidden]))
                    rg = f_act(clipped(xr + zr[:, hidden:]))
                    rh = rd[2 * hidden :]
                    rbh = rb[2 * hidden :] if rb is not None else None
                    if linear_before_reset:
                        lin = torch.matmul(h, rh.t())
                        cand = xh + rg * (lin if rbh is None else lin + rbh)
                    else:
                        cand = xh + torch.matmul(rg * h, rh.t())
                        cand = cand if rbh is None else cand + rbh
                    h_new = (1 - zg) * g[0](clipped(cand)) + zg * h
                    c_new = None
                else:
                    h_new = f_act(clipped(proj[t] + torch.matmul(h, rd.t())))
                    c_new = None
                if masks is not None:
                    m = masks[t]
                    h = torch.where(m, h_new, h)
                    c = torch.where(m, c_new, c) if c_new is not None else c
                    out[t] = torch.where(m, h_new, torch.zeros_like(h_new))
                else:
                    h, c = h_new, c_new if c_new is not None else c
                    out[t] = h
            ys.append(torch.stack(out))  # type: ignore[arg-type]
            hs.append(h)
            cs.append(c)
        y = torch.stack(ys, 1)  # [steps, directions, batch, hidden]
        y_h = torch.stack(hs)
        results = [y, y_h]
        if kind == "LSTM":
            results.append(torch.stack(cs))  # type: ignore[arg-type]
        if layout:
            results = [y.permute(2, 0, 1, 3)] + [s.transpose(0, 1) for s in results[1:]]
        return tuple(results[:n_out]) if n_out > 1 else results[0]

    return run


# ------------------------------------------------------------------------------------ normalization


@register("BatchNormalization")
def _batch_norm(node: Node) -> OpFn:
    if node.attr("training_mode", 0):
        raise node.error("training_mode=1 is not supported (export the model in eval mode)")
    if node.opset < 9 and not node.attr("spatial", 1):
        raise node.error("spatial=0 is not supported")
    eps = float(node.attr("epsilon", 1e-5))
    extra = node.n_outputs - 1

    def bn(x: Tensor, scale: Tensor, bias: Tensor, mean: Tensor, var: Tensor) -> Tensor:
        return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

    if extra:
        return lambda x, s, b, m, v: (bn(x, s, b, m, v), m, v, m, v)[: 1 + extra]
    return bn


@register("InstanceNormalization")
def _instance_norm(node: Node) -> OpFn:
    eps = float(node.attr("epsilon", 1e-5))
    return lambda x, scale, bias: F.instance_norm(x, weight=scale, bias=bias, eps=eps)


@register("LayerNormalization")
def _layer_norm(node: Node) -> OpFn:
    axis = int(node.attr("axis", -1))
    eps = float(node.attr("epsilon", 1e-5))
    if node.n_outputs > 1:
        raise node.error("the Mean / InvStdDev outputs are not supported")

    def ln(x: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
        shape = x.shape[axis % x.dim() :]
        if scale.shape == shape and (bias is None or bias.shape == shape):
            return F.layer_norm(x, shape, scale, bias, eps)
        y = F.layer_norm(x, shape, None, None, eps) * scale
        return y if bias is None else y + bias

    return ln


@register("LRN")
def _lrn(node: Node) -> OpFn:
    size = int(node.attr("size"))
    alpha = float(node.attr("alpha", 1e-4))
    beta = float(node.attr("beta", 0.75))
    bias = float(node.attr("bias", 1.0))
    # ONNX sums channels [c - floor((size-1)/2), c + ceil((size-1)/2)]; torch's local_response_norm pads
    # the other way round for even sizes, hence this version.
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2

    def lrn(x: Tensor) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        sq = (x * x).reshape(n, 1, c, -1)
        sq = F.pad(sq, (0, 0, front, back))
        window = F.avg_pool2d(sq, (size, 1), stride=1) * size
        div = (window.reshape(x.shape) * (alpha / size) + bias) ** beta
        return x / div

    return lrn


def _softmax_like(fn: Callable[..., Tensor]) -> Factory:
    def factory(node: Node) -> OpFn:
        if node.opset < 13:
            # Before opset 13 the input is flattened to 2-D at `axis` and normalised over the second part.
            axis = int(node.attr("axis", 1))

            def flat(x: Tensor) -> Tensor:
                a = axis % x.dim() if x.dim() else 0
                if a == x.dim() - 1:
                    return fn(x, -1)
                return fn(x.reshape(math.prod(x.shape[:a]), -1), 1).reshape(x.shape)

            return flat
        axis = int(node.attr("axis", -1))
        return lambda x: fn(x, axis)

    return factory


register("Softmax")(_softmax_like(torch.softmax))
register("LogSoftmax")(_softmax_like(torch.log_softmax))


# ------------------------------------------------------------------------------------ convolution


def _pair_pads(pads: Sequence[int], nd: int) -> list[tuple[int, int]]:
    return [(int(pads[i]), int(pads[i + nd])) for i in range(nd)]


def _torch_pad(pairs: Sequence[tuple[int, int]]) -> list[int]:
    """ONNX per-axis (begin, end) pairs -> F.pad's last-axis-first list."""
    out: list[int] = []
    for b, e in reversed(pairs):
        out += [b, e]
    return out


def _same_pads(size: int, k_eff: int, stride: int, mode: str) -> tuple[int, int]:
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + k_eff - size)
    small, big = total // 2, total - total // 2
    return (small, big) if mode == "SAME_UPPER" else (big, small)


def _spatial_rank(node: Node, weight_input: int | None = 1) -> int | None:
    for key in ("kernel_shape", "strides", "dilations"):
        if node.attr(key) is not None:
            return len(node.attr(key))
    if node.attr("pads") is not None:
        return len(node.attr("pads")) // 2
    w = node.const(weight_input) if weight_input is not None else None
    return None if w is None else w.ndim - 2


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _by_rank(node: Node, build: Callable[[int], OpFn], weight_input: int = 1) -> OpFn:
    """`build(spatial_rank)`, or, when the rank is unknown until the weight arrives, a dispatcher."""
    nd = _spatial_rank(node, weight_input)
    if nd is not None:
        return build(nd)
    built: dict[int, OpFn] = {}

    def dispatch(x: Tensor, w: Tensor, *rest: Tensor | None) -> Tensor:
        rank = w.dim() - 2
        if rank not in built:
            built[rank] = build(rank)
        return built[rank](x, w, *rest)

    return dispatch


@register("Conv", "ConvTranspose")
def _conv(node: Node) -> OpFn:
    """Conv and ConvTranspose of any supported rank: the attributes they share are read once here."""
    transpose = node.op_type == "ConvTranspose"
    return _by_rank(node, lambda nd: _conv_nd(node, nd, transpose))


def _conv_nd(node: Node, nd: int, transpose: bool) -> OpFn:
    table = _CONV_T if transpose else _CONV
    if nd not in table:
        kind = "transposed convolution" if transpose else "convolution"
        raise node.error(f"cannot run a {nd}-D {kind} (1-D, 2-D and 3-D are supported)")
    groups = int(node.attr("group", 1))
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    auto_pad = node.attr("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER"):
        raise node.error(f"unknown auto_pad {auto_pad!r}")
    pairs = _pair_pads(node.attr("pads", [0] * 2 * nd), nd)
    if auto_pad == "VALID":
        pairs = [(0, 0)] * nd
    if transpose:
        return _conv_transpose_fn(node, table[nd], nd, groups, strides, dilations, auto_pad, pairs)
    conv = table[nd]
    if auto_pad in ("NOTSET", "VALID"):
        if all(b == e for b, e in pairs):
            padding = [b for b, _ in pairs]
            return lambda x, w, b=None: conv(x, w, b, strides, padding, dilations, groups)
        pad = _torch_pad(pairs)
        return lambda x, w, b=None: conv(F.pad(x, pad), w, b, strides, 0, dilations, groups)

    def conv_same(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        k = w.shape[2:]
        same = [
            _same_pads(x.shape[2 + i], (k[i] - 1) * dilations[i] + 1, strides[i], auto_pad) for i in range(nd)
        ]
        return conv(F.pad(x, _torch_pad(same)), w, b, strides, 0, dilations, groups)

    return conv_same


def _conv_transpose_fn(node: Node, conv_t, nd: int, groups, strides, dilations, auto_pad, pairs) -> OpFn:
    out_pad = list(node.attr("output_padding", [0] * nd))
    output_shape = node.attr("output_shape")
    if (
        output_shape is None
        and auto_pad in ("NOTSET", "VALID")
        and all(b == e for b, e in pairs)
        and all(op < max(s, d) for op, s, d in zip(out_pad, strides, dilations))
    ):
        padding = [b for b, _ in pairs]
        return lambda x, w, b=None: conv_t(x, w, b, strides, padding, out_pad, groups, dilations)

    def conv_t_general(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
        # Full transposed convolution, then crop/extend each axis to the ONNX output window.
        y = conv_t(x, w, None, strides, 0, 0, groups, dilations)
        crop = []
        for i in range(nd):
            size_in, k_eff = x.shape[2 + i], (w.shape[2 + i] - 1) * dilations[i] + 1
            full = (size_in - 1) * strides[i] + k_eff
            if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = output_shape[-nd + i] if output_shape is not None else size_in * strides[i]
                total = max(0, full + out_pad[i] - out)
                # The spec's split (ONNX Runtime agrees): SAME_UPPER puts the odd pixel at the end.
                head = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
                # As ONNX Runtime: never pad beyond the full output (the spec would, to in * stride).
                out = full + out_pad[i] - total
            else:
                head = pairs[i][0]
                out = full + out_pad[i] - pairs[i][0] - pairs[i][1]
            crop.append((-head, out - (full - head)))
        y = F.pad(y, _torch_pad(crop))
        if b is not None:
            y = y + b.reshape([1, -1] + [1] * nd)
        return y

    return conv_t_general


# --------------------------------------------------------------------------------------------- pooling

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_windows(x: Tensor, kernel, strides, dilations, pairs, auto_pad, ceil_mode):
    """Per axis (pad_begin, pad_end_incl_ceil_overhang, explicit_pad_end) for the ONNX output size."""
    out = []
    for i, k in enumerate(kernel):
        size, s, k_eff = x.shape[2 + i], strides[i], (k - 1) * dilations[i] + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            b, e = _same_pads(size, k_eff, s, auto_pad)
            n_out = -(-size // s)
        else:
            b, e = pairs[i]
            span = size + b + e - k_eff
            n_out = (-(-span // s) if ceil_mode else span // s) + 1
            # As torch and ONNX Runtime: the last window must start inside the input or the begin pad.
            if ceil_mode and (n_out - 1) * s >= size + b:
                n_out -= 1
        need = (n_out - 1) * s + k_eff
        out.append((b, max(e, need - size - b), e))
    return out


@register("MaxPool")
def _max_pool(node: Node) -> OpFn:
    if node.n_outputs > 1:
        raise node.error("the Indices output is not supported")
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    if nd not in _MAX_POOL:
        raise node.error(f"{nd}-D pooling is not supported")
    pool = _MAX_POOL[nd]
    strides = list(node.attr("strides", [1] * nd))
    dilations = list(node.attr("dilations", [1] * nd))
    auto_pad = node.attr("auto_pad", "NOTSET")
    ceil_mode = bool(node.attr("ceil_mode", 0))
    pairs = [(0, 0)] * nd if auto_pad == "VALID" else _pair_pads(node.attr("pads", [0] * 2 * nd), nd)
    if auto_pad in ("NOTSET", "VALID") and all(b == e and b <= k // 2 for (b, e), k in zip(pairs, kernel)):
        padding = [b for b, _ in pairs]
        return lambda x: pool(x, kernel, strides, padding, dilations, ceil_mode)

    def max_pool(x: Tensor) -> Tensor:
        win = _pool_windows(x, kernel, strides, dilations, pairs, auto_pad, ceil_mode)
        xp = F.pad(x, _torch_pad([(b, e) for b, e, _ in win]), value=-math.inf)
        return pool(xp, kernel, strides, 0, dilations, False)

    return max_pool


@register("AveragePool")
def _avg_pool(node: Node) -> OpFn:
    kernel = list(node.attr("kernel_shape"))
    nd = len(kernel)
    if nd not in _AVG_POOL:
        raise node.error(f"{nd}-D pooling is not supported")
    if any(d != 1 for d in node.attr("dilations", [1] * nd)):
        raise node.error("dilated average pooling is not supported")
    pool = _AVG_POOL[nd]
    strides = list(node.attr("strides", [1] * nd))
    auto_pad = node.attr("auto_pad", "NOTSET")
    ceil_mode = bool(node.attr("ceil_mode", 0))
    include_pad = bool(node.attr("count_include_pad", 0))
    pairs = [(0, 0)] * nd if auto_pad == "VALID" else _pair_pads(node.attr("pads", [0] * 2 * nd), nd)
    if auto_pad in ("NOTSET", "VALID") and all(b == e and b <= k // 2 for (b, e), k in zip(pairs, kernel)):
        padding = [b for b, _ in pairs]
        return lambda x: pool(x, kernel, strides, padding, ceil_mode, include_pad)
    ones = [1] * nd

    def avg_pool(x: Tensor) -> Tensor:
        # Pad explicitly, average with a zero-padded "counted" mask alongside: sum / count for any pads.
        win = _pool_windows(x, kernel, strides, ones, pairs, auto_pad, ceil_mode)
        pad = _torch_pad([(b, e) for b, e, _ in win])
        xp = F.pad(x, pad)
        if include_pad:
            mask = torch.ones(
                [1, 1] + [x.shape[2 + i] + b + e for i, (b, _, e) in enumerate(win)],
                dtype=x.dtype,
                device=x.device,
            )
            mask = F.pad(mask, _torch_pad([(0, e2 - e) for b, e2, e in win]))
        else:
            mask = F.pad(torch.ones([1, 1, *x.shape[2:]], dtype=x.dtype, device=x.device), pad)
        return pool(xp, kernel, strides, 0, False, True) / pool(mask, kernel, strides, 0, False, True)

    return avg_pool


@register("GlobalAveragePool")
def _global_avg_pool(node: Node) -> OpFn:
    return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register("GlobalMaxPool")
def _global_max_pool(node: Node) -> OpFn:
    return lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


# ----------------------------------------------------------------------------------- shape handling


@register("Reshape")
def _reshape(node: Node) -> OpFn:
    allowzero = bool(node.attr("allowzero", 0))
    get = _ints_input(node, 1, "shape", since=5)

    def reshape(x: Tensor, shape: Tensor | None = None) -> Tensor:
        dims = get(shape)
        if not allowzero and 0 in dims:  # 0 copies the input's dimension
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    return reshape


@register("Flatten")
def _flatten(node: Node) -> OpFn:
    axis = int(node.attr("axis", 1))

    def flatten(x: Tensor) -> Tensor:
        a = axis % x.dim() if axis < 0 else axis
        return x.reshape(math.prod(x.shape[:a]), math.prod(x.shape[a:]))

    return flatten


@register("Transpose")
def _transpose(node: Node) -> OpFn:
    perm = node.attr("perm")
    if perm is None:
        return lambda x: x.permute(list(range(x.dim() - 1, -1, -1)))
    perm = list(perm)
    return lambda x: x.permute(perm)


@register("Squeeze")
def _squeeze(node: Node) -> OpFn:
    get = _ints_input(node, 1, "axes", since=13)

    def squeeze(x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = get(axes)
        if dims is None:
            return x.squeeze()
        return x.squeeze(tuple(d % x.dim() for d in dims))

    return squeeze


@register("Unsqueeze")
def _unsqueeze(node: Node) -> OpFn:
    get = _ints_input(node, 1, "axes", since=13)

    def unsqueeze(x: Tensor, axes: Tensor | None = None) -> Tensor:
        dims = get(axes)
        rank = x.dim() + len(dims)
        for d in sorted(d % rank for d in dims):
            x = x.unsqueeze(d)
        return x

    return unsqueeze


@register("Concat")
def _concat(node: Node) -> OpFn:
    axis = int(node.attr("axis"))
    return lambda *xs: torch.cat(xs, axis)


@register("Split")
def _split(node: Node) -> OpFn:
    axis = int(node.attr("axis", 0))
    n = node.n_outputs
    get = _ints_input(node, 1, "split", since=13)
    num_outputs = node.attr("num_outputs")

    def split(x: Tensor, sizes: Tensor | None = None) -> tuple[Tensor, ...]:
        parts = get(sizes)
        if parts is None:
            dim = x.shape[axis]
            # Opset 18's num_outputs: chunks of ceil(dim / n), the last one smaller.
            chunk = -(-dim // (num_outputs or n))
            parts = [min(chunk, dim - i * chunk) for i in range(n)]
        return tuple(torch.split(x, parts, axis))

    return split


@register("Slice")
def _slice(node: Node) -> OpFn:
    if node.opset < 10:
        starts, ends = node.attr("starts"), node.attr("ends")
        axes = node.attr("axes")
        return lambda x: _slice_run(x, starts, ends, axes, None)
    get = [_ints_input(node, i) for i in range(1, 5)]

    def slice_(x, starts, ends, axes=None, steps=None):
        return _slice_run(x, get[0](starts), get[1](ends), get[2](axes), get[3](steps))

    return slice_


def _slice_run(x: Tensor, starts, ends, axes, steps) -> Tensor:
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    index: list[Any] = [slice(None)] * x.dim()
    reverse = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        dim = x.shape[axis]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), dim), min(max(end, 0), dim), step)
        else:
            # torch has no negative-step slicing: gather the indices instead.
            reverse.append((axis, min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step))
    y = x[tuple(index)]
    for axis, start, end, step in reverse:
        y = y.index_select(axis, torch.arange(start, end, step, device=x.device))
    return y


@register("Shape")
def _shape(node: Node) -> OpFn:
    start = node.attr("start", 0)
    end = node.attr("end")
    return lambda x: torch.tensor(x.shape[start:end], dtype=torch.int64, device=x.device)


@register("Size")
def _size(node: Node) -> OpFn:
    return lambda x: torch.tensor(x.numel(), dtype=torch.int64, device=x.device)


@register("Gather")
def _gather(node: Node) -> OpFn:
    axis = int(node.attr("axis", 0))

    def gather(x: Tensor, idx: Tensor) -> Tensor:
        # One advanced index keeps its position: the result is x.shape[:axis] + idx.shape + rest, with
        # negative indices counting from the end, exactly ONNX's Gather.
        a = axis % x.dim()
        return x[(slice(None),) * a + (idx.long(),)]

    return gather


@register("GatherElements")
def _gather_elements(node: Node) -> OpFn:
    axis = int(node.attr("axis", 0))

    def gather_elements(x: Tensor, idx: Tensor) -> Tensor:
        idx = idx.long()
        return torch.gather(x, axis, torch.where(idx < 0, idx + x.shape[axis], idx))

    return gather_elements


@register("Expand")
def _expand(node: Node) -> OpFn:
    get = _ints_input(node, 1)

    def expand(x: Tensor, shape: Tensor) -> Tensor:
        # Bidirectional broadcast: `shape` may hold 1 where x is larger.
        return x.expand(torch.broadcast_shapes(x.shape, tuple(get(shape))))

    return expand


@register("Tile")
def _tile(node: Node) -> OpFn:
    get = _ints_input(node, 1)
    return lambda x, repeats: x.repeat(get(repeats))


@register("Trilu")
def _trilu(node: Node) -> OpFn:
    fn = torch.triu if node.attr("upper", 1) else torch.tril
    get = _ints_input(node, 1)

    def trilu(x: Tensor, k: Tensor | None = None) -> Tensor:
        diagonal = get(k)
        return fn(x, diagonal[0] if diagonal else 0)

    return trilu


@register("CumSum")
def _cumsum(node: Node) -> OpFn:
    exclusive = bool(node.attr("exclusive", 0))
    reverse = bool(node.attr("reverse", 0))
    get = _ints_input(node, 1)

    def cumsum(x: Tensor, axis: Tensor) -> Tensor:
        a = get(axis)[0] % x.dim()
        if reverse:
            x = x.flip(a)
        y = torch.cumsum(x, a)
        if exclusive:
            y = y - x
        return y.flip(a) if reverse else y

    return cumsum


@register("ConstantOfShape")
def _constant_of_shape(node: Node) -> OpFn:
    value = node.attrs.get("value")
    arr = onnx.numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
    dtype = torch_dtype(node, value.data_type if value is not None else onnx.TensorProto.FLOAT)
    fill = arr[0].item()
    get = _ints_input(node, 0)
    return lambda shape: torch.full(get(shape), fill, dtype=dtype, device=shape.device)


@register("Constant")
def _constant(node: Node) -> OpFn:
    # Constant nodes are folded into buffers by the converter; this keeps them runnable anyway.
    value = constant_attr_value(node.proto)
    if value.dtype.kind not in "fiub":
        raise node.error("non-numeric constants are not supported")
    return lambda: torch.from_numpy(np.array(value))


@register("Range")
def _range(node: Node) -> OpFn:
    def range_(start: Tensor, limit: Tensor, delta: Tensor) -> Tensor:
        return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device)

    return range_


# ------------------------------------------------------------------------------------------ reductions


def _reduce(fn: Callable[[Tensor, list[int], bool], Tensor], input_since: int) -> Factory:
    def factory(node: Node) -> OpFn:
        keepdims = bool(node.attr("keepdims", 1))
        noop = bool(node.attr("noop_with_empty_axes", 0))
        get = _ints_input(node, 1, "axes", since=input_since)

        def reduce(x: Tensor, axes: Tensor | None = None) -> Tensor:
            dims = get(axes)
            if not dims:
                if noop:
                    return x
                dims = list(range(x.dim()))
            return fn(x, [d % x.dim() for d in dims], keepdims)

        return reduce

    return factory


def _prod(x: Tensor, dims: list[int], keep: bool) -> Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


for _op, _fn, _since in [
    ("ReduceMean", lambda x, d, k: x.mean(d, keepdim=k), 18),
    ("ReduceSum", lambda x, d, k: x.sum(d, keepdim=k), 13),
    ("ReduceMax", lambda x, d, k: x.amax(d, keepdim=k), 18),
    ("ReduceMin", lambda x, d, k: x.amin(d, keepdim=k), 18),
    ("ReduceProd", _prod, 18),
    ("ReduceSumSquare", lambda x, d, k: (x * x).sum(d, keepdim=k), 18),
    ("ReduceL1", lambda x, d, k: x.abs().sum(d, keepdim=k), 18),
    ("ReduceL2", lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt(), 18),
    ("ReduceLogSumExp", lambda x, d, k: torch.logsumexp(x, d, keepdim=k), 18),
]:
    register(_op)(_reduce(_fn, _since))


def _arg_reduce(fn: Callable[..., Tensor]) -> Factory:
    def factory(node: Node) -> OpFn:
        axis = int(node.attr("axis", 0))
        keepdims = bool(node.attr("keepdims", 1))
        last = bool(node.attr("select_last_index", 0))

        def arg(x: Tensor) -> Tensor:
            if not last:
                return fn(x, axis, keepdims)
            a = axis % x.dim()
            return x.shape[a] - 1 - fn(x.flip(a), a, keepdims)

        return arg

    return factory


register("ArgMax")(_arg_reduce(torch.argmax))
register("ArgMin")(_arg_reduce(torch.argmin))


# ------------------------------------------------------------------------------------- Pad and Resize


@register("Pad")
def _pad(node: Node) -> OpFn:
    mode = node.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        raise node.error(f"unknown mode {mode!r}")
    if node.opset < 11:
        fixed_pads, fixed_value = list(node.attr("pads")), float(node.attr("value", 0.0))
        get_pads = lambda _p: fixed_pads  # noqa: E731
        get_axes = lambda _a: None  # noqa: E731
    else:
        get_pads = _ints_input(node, 1)
        get_axes = _ints_input(node, 3)
        c = node.const(2)
        fixed_value = None if not node.known(2) else (0.0 if c is None else c.reshape(-1)[0].item())

    def pad(x: Tensor, pads=None, value=None, axes=None) -> Tensor:
        p = get_pads(pads)
        ax = get_axes(axes)
        ax = list(range(x.dim())) if ax is None else [a % x.dim() for a in ax]
        n = len(ax)
        pairs = [(0, 0)] * x.dim()
        for i, a in enumerate(ax):
            pairs[a] = (p[i], p[i + n])
        if mode == "constant":
            v = fixed_value if fixed_value is not None else (0.0 if value is None else value.item())
            return F.pad(x, _torch_pad(pairs), value=v)
        for a, (b, e) in enumerate(pairs):
            if b or e:
                size = x.shape[a]
                idx = torch.arange(-b, size + e, device=x.device)
                if mode == "edge":
                    idx = idx.clamp(0, size - 1)
                elif mode == "wrap":
                    idx = idx.remainder(size)
                else:  # reflect, without repeating the edge
                    period = 2 * (size - 1)
                    idx = idx.abs().remainder(period) if period else idx * 0
                    idx = torch.where(idx >= size, period - idx, idx)
                x = x.index_select(a, idx)
        return x

    return pad


def _resize_coords(mode: str, out: int, size: int, scale: float, device) -> Tensor:
    """Source coordinate of each output index, computed in float32 as ONNX Runtime does."""
    x = torch.arange(out, dtype=torch.float32, device=device)
    s = torch.tensor(scale, dtype=torch.float32)
    if mode == "half_pixel":
        return (x + 0.5) / s - 0.5
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / s - 0.5 if out > 1 else torch.zeros_like(x)
    if mode == "asymmetric":
        return x / s
    if mode == "align_corners":
        return x * float(size - 1) / float(out - 1) if out > 1 else torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / s
    if mode == "half_pixel_symmetric":
        adjustment = torch.tensor(out, dtype=torch.float32) / (s * size)
        center = torch.tensor(size / 2, dtype=torch.float32)
        return center * (1 - adjustment) + (x + 0.5) / s - 0.5
    raise ValueError(mode)


def _nearest_index(coords: Tensor, mode: str, downsample: bool) -> Tensor:
    if mode == "round_prefer_floor":
        return torch.ceil(coords - 0.5)
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5)
    if mode == "floor":
        return torch.floor(coords)
    if mode == "ceil":
        return torch.ceil(coords)
    # "simple": Upsample and Resize before opset 11 in ONNX Runtime: truncate, or ceil when shrinking.
    return torch.ceil(coords) if downsample else torch.trunc(coords)


def _cubic_weights(t: Tensor, a: float) -> list[Tensor]:
    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resize_axis(x: Tensor, axis: int, out: int, scale: float, cfg: dict) -> Tensor:
    size = x.shape[axis]
    coords = _resize_coords(cfg["ctm"], out, size, scale, x.device)
    view = [1] * x.dim()
    view[axis] = out
    if cfg["mode"] == "nearest":
        idx = _nearest_index(coords, cfg["nearest_mode"], scale < 1).clamp(0, size - 1).long()
        return x.index_select(axis, idx)
    base = torch.floor(coords)
    t = (coords - base).to(x.dtype)
    base = base.long()
    if cfg["mode"] == "linear":
        x0 = x.index_select(axis, base.clamp(0, size - 1))
        x1 = x.index_select(axis, (base + 1).clamp(0, size - 1))
        t = t.reshape(view)
        return x0 * (1 - t) + x1 * t
    # cubic: taps at base-1 .. base+2
    weights = _cubic_weights(t, cfg["cubic_a"])
    taps = [base + k for k in (-1, 0, 1, 2)]
    if cfg["exclude_outside"]:
        weights = [torch.where((i >= 0) & (i < size), w, torch.zeros_like(w)) for w, i in zip(weights, taps)]
        total = functools.reduce(torch.add, weights)
        weights = [w / total for w in weights]
    y = None
    for w, i in zip(weights, taps):
        term = x.index_select(axis, i.clamp(0, size - 1)) * w.reshape(view)
        y = term if y is None else y + term
    return y


@register("Resize", "Upsample")
def _resize(node: Node) -> OpFn:
    mode = node.attr("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        raise node.error(f"mode {mode!r} is not supported")
    legacy = node.op_type == "Upsample" or node.opset < 11
    cfg = {
        "mode": "linear" if mode == "bilinear" else mode,
        "ctm": "asymmetric" if legacy else node.attr("coordinate_transformation_mode", "half_pixel"),
        "nearest_mode": "simple" if legacy else node.attr("nearest_mode", "round_prefer_floor"),
        "cubic_a": float(node.attr("cubic_coeff_a", -0.75)),
        "exclude_outside": bool(node.attr("exclude_outside", 0)),
    }
    if cfg["ctm"] == "tf_crop_and_resize":
        raise node.error("coordinate_transformation_mode tf_crop_and_resize is not supported")
    if node.attr("antialias", 0):
        raise node.error("antialias=1 is not supported")
    if node.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise node.error("keep_aspect_ratio_policy other than 'stretch' is not supported")
    axes_attr = node.attr("axes")
    if node.op_type == "Upsample" and node.opset < 9:
        fixed_scales = [float(s) for s in node.attr("scales")]
        scale_input, size_input = None, None
    else:
        fixed_scales = None
        scale_input = 1 if legacy else 2
        size_input = None if legacy else 3

    def resize(x: Tensor, *args: Tensor | None) -> Tensor:
        inputs = (x, *args)
        scales = fixed_scales
        sizes = None
        if scales is None:
            s = inputs[scale_input] if scale_input < len(inputs) else None
            if s is not None and s.numel():
                scales = _floats(s.float())
            elif size_input is not None and size_input < len(inputs) and inputs[size_input] is not None:
                sizes = _ints(inputs[size_input])
        axes = list(range(x.dim())) if axes_attr is None else [a % x.dim() for a in axes_attr]
        for i, a in enumerate(axes):
            size = x.shape[a]
            if sizes is not None:
                out = sizes[i]
                scale = float(np.float32(out) / np.float32(size))
            else:
                scale = scales[i]
                out = int(np.floor(np.float32(scale) * np.float32(size)))
            if out == size and scale == 1.0:
                continue  # ONNX Runtime leaves unscaled axes alone, whatever the coordinate mode
            x = _resize_axis(x, a, out, scale, cfg)
        return x

    return resize


# ---------------------------------------------------------------------------------- (de)quantization


@register("QuantizeLinear")
def _quantize_linear(node: Node) -> OpFn:
    axis = int(node.attr("axis", 1))
    default = torch_dtype(node, node.attr("output_dtype", 0) or onnx.TensorProto.UINT8)

    def quantize(x: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
        # The output type is the zero point's (uint8 without one), as ONNX says.
        dtype = default if zero_point is None else zero_point.dtype
        info = torch.iinfo(dtype)
        s = (
            scale
            if scale.dim() == 0
            else scale.reshape([-1 if d == axis % x.dim() else 1 for d in range(x.dim())])
        )
        r = torch.round(x / s)
        if zero_point is not None:
            r = r + zero_point.reshape(s.shape).to(r.dtype)
        return r.clamp(info.min, info.max).to(dtype)

    return quantize


@register("DequantizeLinear")
def _dequantize_linear(node: Node) -> OpFn:
    axis = int(node.attr("axis", 1))

    def dequantize(q: Tensor, scale: Tensor, zero_point: Tensor | None = None) -> Tensor:
        s = (
            scale
            if scale.dim() == 0
            else scale.reshape([-1 if d == axis % q.dim() else 1 for d in range(q.dim())])
        )
        v = q.to(s.dtype)
        if zero_point is not None:
            v = v - zero_point.reshape(s.shape).to(s.dtype)
        return v * s

    return dequantize
