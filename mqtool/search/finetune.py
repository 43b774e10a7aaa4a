"""Finetuning of one policy: quantization-aware, distilled from the fp32 model, through the shared epoch loop.

Weights, per-channel scales and biases are trained; the result is `passes.qparams.QuantParams` for the
emitter (finetuned float weights + scales, which `numerics.quantize` turns into the emitted integers). The
PyTorch twin's own parameters are restored afterwards, so the context stays the pretrained model.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from mqtool import numerics
from mqtool.policy import FLOAT, Format, Policy
from mqtool.search import distributed
from mqtool.search.context import SearchContext
from mqtool.search.metaquantnet import MetaQuantNet, stored_bits, weight_quant_ste
from mqtool.search.train import run_epochs, step_loss, steps_per_epoch

Progress = Callable[[str, dict], None]


class FinetunedWeights(nn.Module):
    """The finetuned tensors as one module, so DistributedDataParallel can average their gradients;
    calling it gives the fake-quantized weights. The biases are the network's own parameters."""

    def __init__(self, weights: dict, scales: dict, axes: dict, biases: dict):
        super().__init__()
        self.names = list(weights)
        # ParameterDict keys cannot hold the dots and slashes of ONNX node names: index them.
        self.w = nn.ParameterList(weights[n] for n in self.names)
        self.s = nn.ParameterList(scales[n] for n in self.names)
        self.b = nn.ParameterList(biases.values())
        self.axes = [axes[n] for n in self.names]

    def forward(self) -> dict[str, torch.Tensor]:
        return {n: weight_quant_ste(w, s, *ax) for n, w, s, ax in zip(self.names, self.w, self.s, self.axes)}


def _start_weights(ctx: SearchContext, wbits: list[int], stored: list[int], mqn: MetaQuantNet | None):
    """Trainable weights and scales per quantized layer: MetaQuantNet's for the policy (`mqn`), else the
    pretrained weights with MSE scales; with each layer's (bits, channel axis, stored bits) and bias."""
    with torch.no_grad():
        gen = mqn.generate_float(wbits) if mqn is not None else {}
    weights, scales, axes, biases = {}, {}, {}, {}
    for layer, b, keep in zip(ctx.info.layers, wbits, stored):
        if b == FLOAT:
            continue
        q = ctx.net.layers[layer.name]
        if layer.name in gen:
            w, s = gen[layer.name]
        else:
            w = q.weight.detach()
            s = torch.from_numpy(numerics.weight_scale(w.cpu().numpy(), b, layer.channel_axis, "mse"))
            s = s.to(ctx.device)
        weights[layer.name] = torch.nn.Parameter(w.detach().clone())
        scales[layer.name] = torch.nn.Parameter(s.detach().clone())
        # the scale is trained as the one made for `b` bits; emission rescales it for `keep` (scale_bits)
        axes[layer.name] = (b, layer.channel_axis, keep)
        if q.bias is not None:
            biases[layer.name] = q.bias
    return weights, scales, axes, biases


def finetune(
    ctx: SearchContext,
    policy: Policy,
    fitness: Callable[[], float],
    progress: Progress,
    *,
    mqn: MetaQuantNet | None = None,
    epochs: int | None = None,
    start: str = "metaquantnet",
    seed: int | None = None,
    deadline: float | None = None,
    on_finished: Callable[[], None] | None = None,
):
    """Quantization-aware training of one policy: (`QuantParams` for the emitter, final fitness).

    `start` is "metaquantnet" (the weights `mqn` generates for the policy), "ptq" (the pretrained weights
    with MSE scales: the uniform-QAT baselines) or "auto" (whichever of the two scores better on the search
    split; `FinetuneConfig.start`). `fitness()` scores the network as it stands on the search
    split (`Scorer.fitness`). `seed` (default: the config's) orders the mini-batches. Past `deadline`
    (time.monotonic) training stops after the current step.

    Finetuning never hands back a model worse than it started from: the search-split fitness (held out
    from training) is taken before the first epoch and after each one, and the best state is kept (on a
    real OCR recogniser, finetuning on a blind objective took the fitness from 2.08 to 3.98).
    `on_finished()` is called with the kept weights in place and activations quantized (e.g. to run the
    held-out check split through the simulation)."""
    from passes.qparams import ActParams, LayerParams, QuantParams

    cfg = ctx.cfg
    epochs = cfg.finetune.epochs if epochs is None else epochs
    wbits = [policy.get(n).weight_bits for n in ctx.names]
    abits = ctx.policy_abits(policy)
    stored = stored_bits(wbits, abits, ctx.reduce8)
    ctx.set_activation_quant(abits, tuple(policy.get(n).format is Format.DYNAMIC for n in ctx.names))
    starts = [start] if start != "auto" else ["metaquantnet", "ptq"] if mqn is not None else ["ptq"]
    tried: dict[str, float] = {}
    for name in starts:  # one candidate start at a time: never more than one extra copy of the weights
        built = _start_weights(ctx, wbits, stored, mqn if name == "metaquantnet" else None)
        if len(starts) > 1:
            with torch.no_grad(), ctx.net.override_weights(FinetunedWeights(*built)()):
                tried[name] = fitness()
            if name != starts[-1]:
                built = None  # freed before the next start is built
    chosen = min(tried, key=tried.__getitem__) if tried else starts[0]
    if chosen != starts[-1]:
        built = _start_weights(ctx, wbits, stored, mqn if chosen == "metaquantnet" else None)
    weights, scales, axes, biases = built
    saved_bias = {n: p.detach().clone() for n, p in biases.items()}
    for p in biases.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(
        [
            {"params": list(weights.values()) + list(biases.values())},
            {"params": list(scales.values()), "lr": cfg.finetune.lr * 0.1},
        ],
        lr=cfg.finetune.lr,
    )
    trainable = FinetunedWeights(weights, scales, axes, biases)
    current = distributed.data_parallel(trainable, False)
    total_steps = max(1, epochs * steps_per_epoch(ctx))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps))
    )

    def after_step() -> None:
        sched.step()
        with torch.no_grad():
            for sc in scales.values():
                sc.clamp_(min=float(numerics.MIN_SCALE))

    def snapshot() -> list[torch.Tensor]:
        return [p.detach().clone() for p in trainable.parameters()]

    def score() -> float:
        with torch.no_grad(), ctx.net.override_weights(trainable()):
            return fitness()

    best_fit, best_state, best_epoch = score(), snapshot(), 0
    start_fit = best_fit

    def after_epoch(epoch: int, loss: float, seconds: float) -> None:
        nonlocal best_fit, best_state, best_epoch
        fit = score()
        if fit < best_fit:
            best_fit, best_state, best_epoch = fit, snapshot(), epoch + 1
        progress(
            "finetune_epoch",
            {"epoch": epoch + 1, "epochs": epochs, "loss": loss, "seconds": seconds, "fitness": fit},
        )

    try:
        if not run_epochs(
            ctx,
            opt,
            range(epochs),
            [cfg.seed if seed is None else seed, 1_000_003],
            lambda rng, step, idx: step_loss(ctx, current(), idx),
            after_step,
            after_epoch,
            deadline,
        ):
            progress("deadline", {"stage": "finetuning"})
        with torch.no_grad():
            for p, v in zip(trainable.parameters(), best_state):
                p.copy_(v)
        final = best_fit
        progress(
            "finetune_done",
            {
                "start": chosen,
                "start_scores": tried,
                "start_fitness": start_fit,
                "fitness": best_fit,
                "best_epoch": best_epoch,
                "epochs": epochs,
            },
        )
        if on_finished is not None:
            with torch.no_grad(), ctx.net.override_weights(trainable()):
                on_finished()
        final_bias = {n: p.detach().cpu().numpy().copy() for n, p in biases.items()}
    finally:
        with torch.no_grad():
            for n, p in biases.items():
                p.copy_(saved_bias[n])
                p.requires_grad_(False)
    layers = {
        n: LayerParams(
            weight=weights[n].detach().cpu().numpy().copy(),
            scale=scales[n].detach().cpu().numpy().astype(np.float32).copy(),
            bias=final_bias.get(n),
        )
        for n in weights
    }
    plan = ctx.act_plan(abits)
    acts = {t: ActParams(range=ctx.act_ranges[t]) for t in plan if t in ctx.act_ranges}
    return QuantParams(layers=layers, activations=acts), final
