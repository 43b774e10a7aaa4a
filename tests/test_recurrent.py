"""LSTM, GRU and RNN in the PyTorch backend against ONNX Runtime, and gradients through them.

Every case is one recurrent node in a tiny in-memory model, run by ONNX Runtime and by `to_torch`, with its
weights as initializers (the converter reads them once) and again with every input fed at run time.
Gradients are checked against torch's own nn.LSTM / nn.GRU / nn.RNN with the same weights.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from mqtool.backend import to_torch
from mqtool.errors import InputError

R = np.random.default_rng(0)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
SEQ, BATCH, INPUT, HIDDEN = 5, 3, 4, 6


def _inputs(kind, dirs, *, bias, h0, c0, peep, lens, layout):
    """Input arrays of the node in ONNX order (None where omitted)."""
    g = GATES[kind]
    x_shape = (SEQ, BATCH, INPUT) if layout == 0 else (BATCH, SEQ, INPUT)
    s_shape = (dirs, BATCH, HIDDEN) if layout == 0 else (BATCH, dirs, HIDDEN)
    vals = [
        R.normal(size=x_shape).astype(np.float32),
        R.normal(0, 0.5, (dirs, g * HIDDEN, INPUT)).astype(np.float32),
        R.normal(0, 0.5, (dirs, g * HIDDEN, HIDDEN)).astype(np.float32),
        R.normal(0, 0.5, (dirs, 2 * g * HIDDEN)).astype(np.float32) if bias else None,
        lens,
        R.normal(size=s_shape).astype(np.float32) if h0 else None,
    ]
    if kind == "LSTM":
        vals.append(R.normal(size=s_shape).astype(np.float32) if c0 else None)
        vals.append(R.normal(0, 0.5, (dirs, 3 * HIDDEN)).astype(np.float32) if peep else None)
    while vals[-1] is None:
        vals.pop()
    return vals


def _model(kind, vals, const, n_out, **attrs) -> onnx.ModelProto:
    names, graph_inputs, inits = [], [], []
    for i, v in enumerate(vals):
        if v is None:
            names.append("")
            continue
        names.append(f"in{i}")
        if i in const:
            inits.append(numpy_helper.from_array(v, f"in{i}"))
        else:
            dtype = helper.np_dtype_to_tensor_dtype(v.dtype)
            graph_inputs.append(helper.make_tensor_value_info(f"in{i}", dtype, v.shape))
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(kind, names, outs, name="rnn", hidden_size=HIDDEN, **attrs)
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_empty_tensor_value_info(o) for o in outs], inits
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    return m


def _reference(kind, vals, n_out, **attrs) -> list[np.ndarray]:
    """ONNX Runtime's outputs. ORT has no layout=1 kernel: a layout-1 case runs as its layout-0 twin
    (inputs and outputs transposed), which checks our layout handling against ORT's numbers."""
    layout = attrs.pop("layout", 0)
    if layout:
        vals = [v if v is None or i not in (0, 5, 6) else v.swapaxes(0, 1) for i, v in enumerate(vals)]
    m = _model(kind, vals, (), n_out, **attrs)
    feeds = {f"in{i}": v for i, v in enumerate(vals) if v is not None}
    out = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    if layout:
        out = [out[0].transpose(2, 0, 1, 3)] + [o.swapaxes(0, 1) for o in out[1:]]
    return out


def _check(kind, vals, n_out=None, **attrs):
    n_out = n_out or (3 if kind == "LSTM" else 2)
    ref = _reference(kind, vals, n_out, **attrs)
    for const in ((1, 2, 3, 7), ()):
        m = _model(kind, vals, const, n_out, **attrs)
        feeds = {f"in{i}": v for i, v in enumerate(vals) if v is not None and i not in const}
        net = to_torch(m)
        got = net.run({k: torch.from_numpy(v) for k, v in feeds.items()})
        for name, r in zip([f"out{i}" for i in range(n_out)], ref):
            g = got[name].detach().numpy()
            assert g.shape == r.shape, (name, g.shape, r.shape)
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=f"{kind} {attrs} {name}")


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0, 1])
def test_parity_with_onnx_runtime(kind, direction, layout):
    dirs = 2 if direction == "bidirectional" else 1
    for bias, h0 in itertools.product([False, True], [False, True]):
        vals = _inputs(kind, dirs, bias=bias, h0=h0, c0=h0, peep=bias, lens=None, layout=layout)
        attrs = {"direction": direction}
        if layout:
            attrs["layout"] = 1
        _check(kind, vals, **attrs)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_sequence_lens_full_and_partial(kind, direction):
    dirs = 2 if direction == "bidirectional" else 1
    for lens in ([SEQ] * BATCH, [SEQ, 2, 4]):
        lens = np.array(lens, np.int32)
        vals = _inputs(kind, dirs, bias=True, h0=True, c0=True, peep=False, lens=lens, layout=0)
        _check(kind, vals, direction=direction)


def test_omitted_outputs_and_options():
    vals = _inputs("LSTM", 1, bias=True, h0=True, c0=True, peep=True, lens=None, layout=0)
    _check("LSTM", vals, n_out=1)
    # Y omitted, only the final states wanted (how exporters often write it).
    m = _model("LSTM", vals, (1, 2, 3, 7), 3)
    m.graph.node[0].output[0] = ""
    del m.graph.output[0]
    feeds = {"in0": vals[0], "in5": vals[5], "in6": vals[6]}
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = to_torch(m)(*[torch.from_numpy(feeds[k]) for k in ("in0", "in5", "in6")])
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g.detach().numpy(), r, rtol=1e-4, atol=1e-5)
    _check("LSTM", vals, clip=0.7)
    _check("LSTM", vals, input_forget=1)
    _check(
        "GRU", _inputs("GRU", 1, bias=True, h0=True, c0=0, peep=0, lens=None, layout=0), linear_before_reset=1
    )
    _check("GRU", _inputs("GRU", 2, bias=True, h0=True, c0=0, peep=0, lens=None, layout=0),
           direction="bidirectional", linear_before_reset=1, clip=1.5)  # fmt: skip
    _check(
        "RNN",
        _inputs("RNN", 2, bias=True, h0=False, c0=0, peep=0, lens=None, layout=0),
        direction="bidirectional",
        activations=["Relu", "Sigmoid"],
    )
    _check(
        "LSTM",
        vals,
        activations=["HardSigmoid", "LeakyRelu", "Tanh"],
        activation_alpha=[0.3, 0.05],
        activation_beta=[0.4],
    )


def test_unsupported_activation_is_named():
    vals = _inputs("RNN", 1, bias=False, h0=False, c0=0, peep=0, lens=None, layout=0)
    m = _model("RNN", vals, (1, 2), 2, activations=["Gelu"])
    with pytest.raises(InputError, match=r"node 'rnn' \(RNN\): activation 'Gelu' is not supported"):
        to_torch(m)


def _torch_twin(kind, w, r, b, bidirectional):
    """torch's own recurrent module holding the ONNX weights (gate orders differ: ONNX LSTM i,o,f,c vs
    torch i,f,g,o; ONNX GRU z,r,h vs torch r,z,n)."""
    cls = {"LSTM": torch.nn.LSTM, "GRU": torch.nn.GRU, "RNN": torch.nn.RNN}[kind]
    mod = cls(INPUT, HIDDEN, bidirectional=bidirectional)
    order = {"LSTM": [0, 2, 3, 1], "GRU": [1, 0, 2], "RNN": [0]}[kind]
    g = GATES[kind]

    def reorder(t):
        return np.concatenate([t[k * HIDDEN : (k + 1) * HIDDEN] for k in order])

    with torch.no_grad():
        for d in range(2 if bidirectional else 1):
            sfx = "_reverse" if d else ""
            getattr(mod, f"weight_ih_l0{sfx}").copy_(torch.from_numpy(reorder(w[d])))
            getattr(mod, f"weight_hh_l0{sfx}").copy_(torch.from_numpy(reorder(r[d])))
            getattr(mod, f"bias_ih_l0{sfx}").copy_(torch.from_numpy(reorder(b[d, : g * HIDDEN])))
            getattr(mod, f"bias_hh_l0{sfx}").copy_(torch.from_numpy(reorder(b[d, g * HIDDEN :])))
    return mod


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradients_match_torch_modules(kind):
    """The search trains through the backend: gradients reach the input and the initial state, and equal
    those of torch's own module with the same weights."""
    dirs = 2
    vals = _inputs(kind, dirs, bias=True, h0=True, c0=True, peep=False, lens=None, layout=0)
    attrs = {"direction": "bidirectional"}
    if kind == "GRU":
        attrs["linear_before_reset"] = 1  # torch's GRU
    m = _model(kind, vals, (1, 2, 3), 3 if kind == "LSTM" else 2, **attrs)
    net = to_torch(m)
    ours = [torch.from_numpy(vals[i]).requires_grad_() for i in (0, 5, 6)[: 3 if kind == "LSTM" else 2]]
    y = net(*ours)[0]  # [seq, dirs, batch, hidden]
    twin = _torch_twin(kind, vals[1], vals[2], vals[3], True)
    theirs = [torch.from_numpy(vals[i]).requires_grad_() for i in (0, 5, 6)[: len(ours)]]
    state = (theirs[1], theirs[2]) if kind == "LSTM" else theirs[1]
    y_t, _ = twin(theirs[0], state)  # [seq, batch, dirs * hidden]
    y_t = y_t.reshape(SEQ, BATCH, 2, HIDDEN).permute(0, 2, 1, 3)
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-5)
    weights = torch.from_numpy(R.normal(size=y.shape).astype(np.float32))
    (y * weights).sum().backward()
    (y_t * weights).sum().backward()
    for a, b in zip(ours, theirs):
        assert a.grad is not None and a.grad.abs().sum() > 0
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
