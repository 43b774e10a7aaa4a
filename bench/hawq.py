"""HAWQ-style bit allocation (baseline 4 of docs/benchmarks.md), on the PyTorch backend of a SearchEngine.

Per-layer Hessian trace by Hutchinson's method (finite-difference Hessian-vector products; as NNCF does: ~100 samples, at most 200 iterations, stop when
the running mean changes by less than a relative 1e-4), sensitivity Omega_l(b) = trace_l / params_l *
||Q_b(W_l) - W_l||^2 with per-channel MSE scales, and the exact allocation under an average-weight-bits
budget by `scipy.optimize.milp` (one binary per layer and width). Not a benchmark by itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from mqtool import numerics
from mqtool.policy import LayerBits, Policy


def hessian_traces(
    engine, samples: int = 100, max_iter: int = 200, tol: float = 1e-4, seed: int = 0, rel_eps: float = 1e-2
) -> dict[str, float]:
    """Hutchinson estimate of tr(H_l) of the cross-entropy loss for every layer weight (float model).

    Hessian-vector products by central differences of the gradient, H d ~ (g(w + d) - g(w - d)) / 2, with
    d_l = eps_l * v_l (Rademacher v, eps_l = rel_eps * rms(W_l)): two ordinary backward passes per iteration.
    (Double backward through autograd gives the same estimator but took 4-20 s per iteration on this
    machine for the 16-layer CNN, so 200 iterations would not fit a benchmark run.)
    """
    engine.ctx.set_activation_quant(None)
    gen = torch.Generator().manual_seed(seed)
    idx = np.arange(min(samples, len(engine.ctx.train)))
    feeds = engine.ctx.feeds(engine.ctx.train, idx)
    y = torch.from_numpy(engine.ctx.train.y[idx])
    names = engine.ctx.names
    base = [engine.ctx.net.layers[n].weight.detach().clone() for n in names]
    eps = [rel_eps * float(w.pow(2).mean().sqrt().clamp_min(1e-8)) for w in base]

    def grads(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        ps = [w.requires_grad_(True) for w in ws]
        with engine.ctx.net.override_weights(dict(zip(names, ps))):
            loss = F.cross_entropy(engine.ctx.forward_feeds(feeds)[0].flatten(1), y)
        return list(torch.autograd.grad(loss, ps))

    sums = np.zeros(len(names))
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        vs = [torch.randint(0, 2, w.shape, generator=gen).float() * 2 - 1 for w in base]
        gp = grads([w + e * v for w, e, v in zip(base, eps, vs)])
        gm = grads([w - e * v for w, e, v in zip(base, eps, vs)])
        sums += np.array(
            [float((v * (a - b)).sum()) / (2 * e) for v, a, b, e in zip(vs, gp, gm, eps)], dtype=np.float64
        )
        mean = sums.sum() / it
        if it % 25 == 0:
            print(f"hutchinson iteration {it}: total trace {mean:.4g}", flush=True)
        if prev is not None and it >= 10 and abs(mean - prev) / (abs(prev) + 1e-12) < tol:
            break
        prev = mean
    return {n: float(s / it) for n, s in zip(names, sums)}


def quant_error(engine, bits: int) -> dict[str, float]:
    """||Q_b(W) - W||^2 per layer (per-channel MSE scales)."""
    out = {}
    for layer in engine.ctx.info.layers:
        w = engine.ctx.net.layers[layer.name].weight.detach().numpy()
        s = numerics.weight_scale(w, bits, layer.channel_axis, "mse")
        qmin, qmax = numerics.int_range(bits, signed=True)
        wq = numerics.fake_quantize(w, s, np.zeros_like(s, dtype=np.int64), qmin, qmax, layer.channel_axis)
        out[layer.name] = float(((wq - w) ** 2).sum())
    return out


def sensitivities(engine, traces: dict[str, float], widths: list[int]) -> dict[int, dict[str, float]]:
    """Omega[b][layer] = trace / params * ||Q_b(W) - W||^2."""
    params = {layer.name: layer.params for layer in engine.ctx.info.layers}
    out = {}
    for b in widths:
        err = quant_error(engine, b)
        out[b] = {n: traces[n] / params[n] * err[n] for n in engine.ctx.names}
    return out


def sensitivity_sum(omega: dict[int, dict[str, float]], policy: Policy) -> float:
    return float(sum(omega[policy.get(n).weight_bits][n] for n in next(iter(omega.values()))))


def allocate(engine, omega: dict[int, dict[str, float]], target_bits: float, act_bits: int = 8) -> Policy:
    """The policy minimising sum Omega under average weight bits <= target (exact, MILP)."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = engine.ctx.names
    widths = sorted(omega)
    params = np.array([layer.params for layer in engine.ctx.info.layers], dtype=np.float64)
    n, k = len(names), len(widths)
    c = np.array([omega[b][nm] for nm in names for b in widths])
    one = np.zeros((n, n * k))
    for i in range(n):
        one[i, i * k : (i + 1) * k] = 1
    budget = np.array([params[i] * b for i in range(n) for b in widths])[None, :] / params.sum()
    res = milp(
        c,
        constraints=[LinearConstraint(one, 1, 1), LinearConstraint(budget, 0, target_bits + 1e-9)],
        integrality=np.ones(n * k),
        bounds=Bounds(0, 1),
    )
    if not res.success:
        raise RuntimeError(f"HAWQ allocation at {target_bits} bits: {res.message}")
    x = res.x.reshape(n, k)
    bits = [widths[int(np.argmax(row))] for row in x]
    return Policy({nm: LayerBits(b, act_bits) for nm, b in zip(names, bits)}, meta={"source": "hawq"})
