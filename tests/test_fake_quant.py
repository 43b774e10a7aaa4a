"""Fake quantization in torch (`mqtool.backend.fake_quant`) against the NumPy definition (`mqtool.numerics`).

Forward values must be bit-identical (`np.array_equal`), including exact .5 ties, saturation and NaN/inf;
gradients are the straight-through estimator with LSQ's scale gradient. On the example CNN, gradients must
reach every layer's weight and every learnable scale, and activation quantizers placed on named tensors
must quantize exactly those tensors.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mqtool import numerics
from mqtool.backend import ActFakeQuant, WeightFakeQuant, fake_quantize, quantize_weight_ste, to_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@st.composite
def quant_case(draw):
    """(x, scale, zero_point, qmin, qmax, axis): values mixing random floats, exact ties and saturation."""
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    qmin, qmax = numerics.int_range(bits, signed)
    axis = draw(st.sampled_from([None, 0, 1]))
    shape = (draw(st.integers(1, 5)), draw(st.integers(1, 6)), draw(st.integers(1, 3)))
    channels = 1 if axis is None else shape[axis]
    exps = draw(st.lists(st.integers(-12, 4), min_size=channels, max_size=channels))
    pow2 = draw(st.booleans())
    if pow2:
        scale = np.array([2.0**e for e in exps], np.float32)
    else:
        mant = draw(st.lists(st.floats(1.0, 2.0, width=32), min_size=channels, max_size=channels))
        scale = np.array([m * 2.0**e for m, e in zip(mant, exps)], np.float32)
    zp = 0 if signed else draw(st.integers(qmin, qmax))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    s = scale.reshape([-1 if d == axis else 1 for d in range(3)]) if axis is not None else scale[0]
    # Integers k (some outside the range) give exact ties at (k + 0.5) * s when s is a power of two.
    k = rng.integers(qmin - zp - 4, qmax - zp + 4, size=shape).astype(np.float32)
    kind = rng.integers(0, 3, size=shape)
    x = np.where(
        kind == 0, (k + 0.5) * s, np.where(kind == 1, k * s, rng.normal(0, 1, shape) * (qmax - qmin) * s)
    )
    x = x.astype(np.float32)
    return x, (scale if axis is not None else scale[0]), zp, qmin, qmax, axis


@settings(max_examples=200, deadline=None)
@given(quant_case())
def test_fake_quantize_equals_numerics_bit_for_bit(case) -> None:
    x, scale, zp, qmin, qmax, axis = case
    ref = numerics.fake_quantize(x, scale, zp, qmin, qmax, axis)
    got = fake_quantize(torch.from_numpy(x), torch.from_numpy(np.asarray(scale)), zp, qmin, qmax, axis)
    assert got.dtype == torch.float32
    assert np.array_equal(got.numpy(), ref)
    # the autograd path (training) and the in-place path (inference) compute the same bits
    trained = fake_quantize(
        torch.from_numpy(x).requires_grad_(), torch.from_numpy(np.asarray(scale)), zp, qmin, qmax, axis
    )
    assert np.array_equal(trained.detach().numpy(), ref)


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 8), st.sampled_from([0, 1]), st.integers(0, 2**32 - 1))
def test_weight_quantizer_equals_numerics(bits: int, axis: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((6, 5, 3)) * rng.uniform(0.01, 3)).astype(np.float32)
    q = WeightFakeQuant.from_weight(w, bits, axis)
    assert np.array_equal(q.scale.detach().numpy(), numerics.weight_scale(w, bits, axis, "mse"))
    qmin, qmax = numerics.int_range(bits, signed=True)
    ref = numerics.fake_quantize(w, q.scale.detach().numpy(), 0, qmin, qmax, axis)
    assert np.array_equal(q(torch.from_numpy(w)).detach().numpy(), ref)
    values, scale = q.export(torch.from_numpy(w))
    ref_values, ref_scale = numerics.quantize_weight(w, bits, axis)
    assert np.array_equal(values, ref_values) and np.array_equal(scale, ref_scale)
    assert values.min() >= qmin and values.max() <= qmax


def test_ties_round_half_to_even_and_saturate() -> None:
    s = np.float32(0.25)
    x = (np.arange(-12, 12, dtype=np.float32) + 0.5) * s
    got = fake_quantize(torch.from_numpy(x), s, 0, -8, 7).numpy()
    expected = np.clip(np.round(x / s), -8, 7) * s  # np.round is half-to-even
    assert np.array_equal(got, expected)
    assert got[x / s == 0.5][0] == 0.0 and got[x / s == 1.5][0] == 2 * s and got[x / s == -2.5][0] == -2 * s
    assert got.min() == -8 * s and got.max() == 7 * s


def test_nan_and_inf_follow_numerics() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    ref = numerics.fake_quantize(x, 0.1, 3, 0, 15)
    got = fake_quantize(torch.from_numpy(x), 0.1, 3, 0, 15).numpy()
    assert np.array_equal(got, ref)


def test_ste_and_lsq_gradients() -> None:
    x = torch.tensor([-10.0, -0.74, -0.26, 0.1, 0.6, 0.8, 10.0], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    y = fake_quantize(x, s, 0, -2, 1)
    y.sum().backward()
    # d/dx is 1 where the clamp did not change round(x / s) (as torch.fake_quantize_per_tensor_affine):
    # 0.6 / 0.5 rounds to 1 = qmax (passes), 0.8 / 0.5 rounds to 2 (clipped).
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    v = x.detach() / 0.5
    r = torch.round(v)
    lsq = torch.where(r < -2, torch.tensor(-2.0), torch.where(r > 1, torch.tensor(1.0), r - v))
    assert torch.allclose(s.grad, lsq.sum())


def test_per_channel_scale_gradient_matches_autograd_reference() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    s = torch.tensor([0.2, 0.3, 0.5, 0.7], requires_grad=True)
    quantize_weight_ste(w, 3, s, 0).pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    s2 = s.detach().clone().requires_grad_()
    v = w2 / s2.reshape(-1, 1, 1, 1)
    q = (v + (torch.round(v) - v).detach()).clamp(-4, 3)
    (q * s2.reshape(-1, 1, 1, 1)).pow(2).sum().backward()
    assert torch.allclose(w.grad, w2.grad, atol=1e-5) and torch.allclose(s.grad, s2.grad, atol=1e-4)


def test_weight_quantizer_bits_per_call_and_lsq_grad_scale() -> None:
    w = torch.randn(8, 16)
    q = WeightFakeQuant.from_weight(w, 4, 0)
    s2 = torch.from_numpy(numerics.weight_scale(w.numpy(), 2, 0))
    two = q(w, bits=2, scale=s2)
    assert set(torch.unique(torch.round(two / s2[:, None])).tolist()) <= {-2.0, -1.0, 0.0, 1.0}
    q.bits = 3
    assert torch.equal(q(w), quantize_weight_ste(w, 3, q.scale.detach(), 0))
    # LSQ: the scale's gradient is multiplied by 1 / sqrt(numel * qmax).
    q(w).sum().backward()
    s = q.scale.detach().clone().requires_grad_()
    quantize_weight_ste(w, 3, s, 0).sum().backward()
    assert s.grad.abs().sum() > 0
    assert torch.allclose(q.scale.grad, s.grad / np.sqrt(w.numel() * 3))


def test_act_quantizer_from_range_and_set_bits() -> None:
    a = ActFakeQuant.from_range(-0.3, 5.0, bits=8)
    scale, zp = numerics.activation_qparams(-0.3, 5.0, 8)
    assert a.qparams() == (scale, zp)
    x = np.linspace(-1, 6, 101, dtype=np.float32)
    assert np.array_equal(a(torch.from_numpy(x)).numpy(), numerics.fake_quantize(x, scale, zp, 0, 255))
    a.set_bits(3)
    scale3, zp3 = numerics.activation_qparams(-0.3, 5.0, 3)
    assert a.qparams() == (scale3, zp3)
    assert np.array_equal(a(torch.from_numpy(x)).numpy(), numerics.fake_quantize(x, scale3, zp3, 0, 7))
    assert not a.scale.requires_grad
    assert ActFakeQuant.from_range(0, 1, 4, learnable=True).scale.requires_grad


# ------------------------------------------------------------------------------- on the example CNN


def _cnn() -> tuple[onnx.ModelProto, np.ndarray]:
    path = os.path.join(ROOT, "examples", "mnist_cnn", "model.onnx")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing (run examples/mnist_cnn/train.py)")
    return onnx.load(path), np.load(os.path.join(ROOT, "examples", "mnist_cnn", "test.npz"))["x"][:16]


def test_gradients_reach_every_layer_and_learnable_scale() -> None:
    model, x = _cnn()
    module = to_torch(model)
    assert len(module.layers) >= 8
    xt = torch.from_numpy(x)
    with torch.no_grad():
        acts = module.run({module.input_names[0]: xt}, [layer.info.input for layer in module.layers.values()])
    for layer in module.layers.values():
        layer.weight_quant = WeightFakeQuant.from_weight(layer.weight, 4, layer.channel_axis)
        t = acts[layer.info.input]
        module.set_act_quant(
            layer.info.input, ActFakeQuant.from_range(t.min().item(), t.max().item(), 8, learnable=True)
        )
    module.train()
    logits = module(xt)
    torch.nn.functional.cross_entropy(logits, torch.arange(len(x)) % 10).backward()
    for name, layer in module.layers.items():
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0, name
        assert layer.weight_quant.scale.grad is not None and layer.weight_quant.scale.grad.abs().sum() > 0, (
            name
        )
        if layer.bias is not None:
            assert layer.bias.grad.abs().sum() > 0, name
    for tensor, q in module.act_quantizers.items():
        assert q.scale.grad is not None and q.scale.grad != 0, tensor
    # Every learnable tensor is registered: an optimizer over module.parameters() trains them all.
    params = {id(p) for p in module.parameters()}
    assert all(id(q.scale) in params for q in module.act_quantizers.values())
    assert all(id(layer.weight_quant.scale) in params for layer in module.layers.values())


def test_override_weights_is_differentiable_and_cleared() -> None:
    model, x = _cnn()
    module = to_torch(model)
    xt = torch.from_numpy(x)
    name, layer = next(iter(module.layers.items()))
    gain = torch.ones(layer.weight.shape[0], requires_grad=True)
    generated = layer.weight.detach() * gain.reshape([-1] + [1] * (layer.weight.dim() - 1)) * 0.5
    with torch.no_grad():
        base = module(xt)
    with module.override_weights({name: generated}):
        out = module(xt)
    assert layer.weight_override is None
    assert not torch.allclose(out, base)
    out.pow(2).sum().backward()
    assert gain.grad is not None and gain.grad.abs().sum() > 0
    assert layer.weight.grad is None  # the parameter was not used
    with torch.no_grad():
        assert torch.equal(module(xt), base)
    with pytest.raises(ValueError, match="shape"), module.override_weights({name: torch.zeros(3)}):
        pass


def test_act_quant_quantizes_exactly_the_named_tensors() -> None:
    model, x = _cnn()
    module = to_torch(model)
    feeds = {module.input_names[0]: torch.from_numpy(x)}
    first = next(iter(module.layers.values()))
    # The first layer's input (the graph input) and a tensor read by a residual Add and by a Conv.
    add = next(n for n in model.graph.node if n.op_type == "Add")
    targets = [first.info.input, add.input[0]]
    with torch.no_grad():
        plain = module.run(feeds, targets)
        for t in targets:
            # Quantizers upstream change this tensor: read it with them in place, then quantize it.
            before = module.run(feeds, [t])[t].numpy()
            scale, zp = numerics.activation_qparams(float(before.min()), float(before.max()) * 0.8, 4)
            module.set_act_quant(t, ActFakeQuant(4, scale, zp))
            got = module.run(feeds, [t])
            assert np.array_equal(got[t].numpy(), numerics.fake_quantize(before, scale, zp, 0, 15)), t
            assert not np.array_equal(got[t].numpy(), before)
        # Consumers see the quantized tensor.
        final = module.run(feeds, [first.info.input, first.info.output])
        assert torch.equal(final[first.info.output], first(final[first.info.input]))
        module.clear_act_quant()
        assert not module.act_quantizers and not list(module.act_quant.parameters())
        again = module.run(feeds, targets)
        assert all(torch.equal(again[t], plain[t]) for t in targets)


# ------------------------------------------------------------------- 2-bit range: full vs ternary


def _best_mse(w: np.ndarray, qmin: int, qmax: int, grid: int = 400) -> float:
    """Mean squared error of per-row k-bit quantization with the best scale on a dense grid."""
    amax = np.abs(w).max(axis=1)
    best = np.full(w.shape[0], np.inf)
    for c in np.linspace(0.01, 1.0, grid, dtype=np.float32):
        s = (amax * c).astype(np.float32)
        err = ((numerics.fake_quantize(w, s, 0, qmin, qmax, axis=0) - w) ** 2).mean(axis=1, dtype=np.float64)
        best = np.minimum(best, err)
    return float(best.mean())


def range_choice_mse(w: np.ndarray) -> tuple[float, float]:
    """(MSE of numerics' 2-bit full range {-2,-1,0,1} with its MSE scale, MSE of ternary {-1,0,1} with the
    best scale on a dense grid), per output channel (rows), averaged."""
    scale = numerics.weight_scale(w, 2, 0, "mse")
    full = float(((numerics.fake_quantize(w, scale, 0, -2, 1, axis=0) - w) ** 2).mean(dtype=np.float64))
    return full, _best_mse(w, -1, 1)


@pytest.mark.parametrize("dist", ["gaussian", "laplacian"])
def test_full_2bit_range_beats_ternary(dist: str) -> None:
    rng = np.random.default_rng(0)
    shape = (64, 576)
    w = rng.standard_normal(shape) if dist == "gaussian" else rng.laplace(size=shape)
    full, ternary = range_choice_mse((w * 0.05).astype(np.float32))
    # Measured: 0.78x (Gaussian), 0.80x (Laplacian). The claim in numerics.py's docstring.
    assert full < 0.9 * ternary, (full, ternary)


@torch.no_grad()
def test_act_quantizer_inference_constants_follow_changes() -> None:
    # The no-grad path caches scale and zero point; every way they can change must reach it.
    x = np.array([np.nan, np.inf, -np.inf, -0.7, 0.0, 0.49, 2.5, 9.0], np.float32)
    a = ActFakeQuant.from_range(-0.5, 4.0, bits=8)
    for bits in (8, 3, 5):
        a.set_bits(bits)  # after at least one call with other constants
        scale, zp = a.qparams()
        expected = numerics.fake_quantize(x, scale, zp, 0, 2**bits - 1)
        assert np.array_equal(a(torch.from_numpy(x)).numpy(), expected, equal_nan=True)
    b = ActFakeQuant(8, 0.25, 10)
    b(torch.from_numpy(x))
    b.load_state_dict(a.state_dict())  # in-place copies into the cached tensors
    b.bits, b.qmin, b.qmax = a.bits, a.qmin, a.qmax
    assert np.array_equal(b(torch.from_numpy(x)).numpy(), a(torch.from_numpy(x)).numpy())
    assert b.clamps_at_zero() == (a.qparams()[1] == 0)
