"""Fold BatchNormalization into the Conv / ConvTranspose / Gemm that feeds it.

With s = gamma / sqrt(var + eps) and t = beta - mean * s, per output channel c:
    W'[c] = W[c] * s[c]        b'[c] = b[c] * s[c] + t[c]
(for Gemm the bias C' = s * C + t / beta, since Gemm computes alpha * A @ B + beta * C).

Before::

    Conv "conv1"(x, W, b) -> a
    BatchNormalization(a, gamma, beta, mean, var) -> y

After::

    Conv "conv1"(x, W', b') -> y

Only when the layer's output feeds nothing but the BatchNormalization (and is not a graph output), the BN is in
inference mode with only its first output used, and every parameter is an initializer (run fold_constants
first). The layer keeps its node name, so policies written for the original model still apply. A weight that
other nodes also read is copied under a fresh name instead of being changed under them.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from passes.base import PassResult
from passes.graph import Namer, attr, initializers, remove_nodes, set_attr

log = logging.getLogger(__name__)

_LAYERS = ("Conv", "ConvTranspose", "Gemm")


def fold_batchnorm(model: onnx.ModelProto) -> PassResult:
    """Fold every foldable BatchNormalization into its producer (in place)."""
    g = model.graph
    namer = Namer(g)
    index = _Index(g)
    removed = [
        k
        for k, bn in enumerate(g.node)
        if bn.op_type == "BatchNormalization"
        and bn.domain in ("", "ai.onnx")
        and _fold_one(g, bn, namer, index)
    ]
    remove_nodes(g, removed)
    return PassResult(model, bool(removed))


class _Index:
    """Who writes each tensor (the last writer in node order, as `producers` has it), how many nodes read it
    (as `len(consumers[t])`) and the initializers, kept up to date as layers absorb their BNs. Rebuilding
    them per BN made folding quadratic in the node count (DenseNet-121: 1.1 s). Folded BNs stay in the graph
    until the end, so node indices do not move."""

    def __init__(self, g: onnx.GraphProto):
        self.g = g
        self.writers: dict[str, list[int]] = defaultdict(list)
        self.readers: Counter[str] = Counter()
        for k, n in enumerate(g.node):
            for o in n.output:
                if o:
                    self.writers[o].append(k)
            self.readers.update({i for i in n.input if i})
        self.inits = initializers(g)
        self.indexed_inits = len(g.initializer)
        self.outputs = {o.name for o in g.output}

    def producer(self, name: str) -> int | None:
        ks = self.writers.get(name)
        return ks[-1] if ks else None

    def rewired(self, k: int, inputs_before: set[str], output_before: str) -> None:
        """Node `k` now reads its current inputs instead of `inputs_before` and writes output 0 instead of
        `output_before`; initializers appended since are indexed by name."""
        node = self.g.node[k]
        inputs = {i for i in node.input if i}
        self.readers.subtract(inputs_before - inputs)
        self.readers.update(inputs - inputs_before)
        if node.output[0] != output_before:
            if output_before not in node.output:
                self.writers[output_before].remove(k)
            self.writers[node.output[0]].append(k)
            self.writers[node.output[0]].sort()
        for init in self.g.initializer[self.indexed_inits :]:
            self.inits[init.name] = init
        self.indexed_inits = len(self.g.initializer)


def _fold_one(g: onnx.GraphProto, bn: onnx.NodeProto, namer: Namer, index: _Index) -> bool:
    inits, outputs = index.inits, index.outputs
    x = bn.input[0]
    k = index.producer(x)
    layer = g.node[k] if k is not None else None
    if layer is None or layer.op_type not in _LAYERS or layer.domain not in ("", "ai.onnx"):
        return False
    if index.readers[x] != 1 or x in outputs:  # the BN must be the layer's only reader
        return False
    if attr(bn, "training_mode", 0) or any(o for o in bn.output[1:]):
        return False
    if len(bn.input) < 5 or not all(i in inits for i in bn.input[1:5]):
        return False
    if len(layer.input) < 2 or layer.input[1] not in inits:
        return False
    if len(layer.input) > 2 and layer.input[2] and layer.input[2] not in inits:
        return False
    gamma, beta, mean, var = (numpy_helper.to_array(inits[i]).astype(np.float64) for i in bn.input[1:5])
    eps = float(attr(bn, "epsilon", 1e-5))
    w_init = inits[layer.input[1]]
    w = numpy_helper.to_array(w_init)
    if w.dtype.kind != "f":
        return False
    s = gamma / np.sqrt(var + eps)
    t = beta - mean * s
    channels = _channel_scale(layer, w, s)
    if channels is None:
        return False
    w_new = (w.astype(np.float64) * channels).astype(w.dtype)
    bias_name = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    if layer.op_type == "Gemm":
        beta_attr = float(attr(layer, "beta", 1.0))
        if bias_name is None:
            b_new = t
            set_attr(layer, "beta", 1.0)
        elif beta_attr == 0.0:
            return False
        else:
            c = numpy_helper.to_array(inits[bias_name]).astype(np.float64)
            b_new = s * c + t / beta_attr
    else:
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float64) if bias_name else np.zeros_like(s)
        b_new = b * s + t
    b_new = np.asarray(b_new).astype(w.dtype)

    inputs_before = {i for i in layer.input if i}
    w_name = w_init.name
    if index.readers[w_name] > 1:
        w_name = namer(f"{layer.name or w_init.name}_weight_bn")
        layer.input[1] = w_name
    if w_name == w_init.name:
        w_init.CopyFrom(numpy_helper.from_array(w_new, w_name))
    else:
        g.initializer.append(numpy_helper.from_array(w_new, w_name))
    if bias_name is None or index.readers[bias_name] > 1:
        new_bias = namer(f"{layer.name or bn.name}_bias_bn")
        g.initializer.append(numpy_helper.from_array(b_new, new_bias))
        while len(layer.input) < 3:
            layer.input.append("")
        layer.input[2] = new_bias
    else:
        inits[bias_name].CopyFrom(numpy_helper.from_array(b_new, bias_name))
    layer.output[0] = bn.output[0]
    index.rewired(k, inputs_before, x)
    log.debug("folded %s into %s", bn.name, layer.name)
    return True


def _channel_scale(layer: onnx.NodeProto, w: np.ndarray, s: np.ndarray) -> np.ndarray | None:
    """`s` broadcast against the weight's layout, or None when the shapes do not line up."""
    if layer.op_type == "Conv":
        if w.ndim < 2 or w.shape[0] != s.size:
            return None
        return s.reshape([-1] + [1] * (w.ndim - 1))
    if layer.op_type == "ConvTranspose":
        # W is [Cin, Cout/groups, k...]; output channel of W[ci, j] is group(ci) * Cout/groups + j.
        groups = int(attr(layer, "group", 1))
        if w.ndim < 2 or w.shape[0] % groups or w.shape[1] * groups != s.size:
            return None
        per_group_in = w.shape[0] // groups
        grp = np.arange(w.shape[0]) // per_group_in
        out_ch = grp[:, None] * w.shape[1] + np.arange(w.shape[1])[None, :]
        return s[out_ch].reshape(list(w.shape[:2]) + [1] * (w.ndim - 2))
    # Gemm: B is [K, N], or [N, K] with transB; BN normalises the N output columns.
    if w.ndim != 2:
        return None
    axis = 0 if attr(layer, "transB", 0) else 1
    if w.shape[axis] != s.size:
        return None
    return s.reshape((-1, 1) if axis == 0 else (1, -1))
