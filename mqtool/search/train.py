"""Training: the one epoch loop that MetaQuantNet training and finetuning share, and MetaQuantNet's training.

The loop owns what must be identical in both: a per-epoch generator (a resumed run replays exactly the
epochs an uninterrupted one would), mini-batches shared across torchrun ranks with gradients averaged over
the whole batch, and the distillation loss of `Objective.train_loss` on the training split.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from mqtool.policy import FLOAT
from mqtool.search import checkpoint, distributed
from mqtool.search.context import SearchContext
from mqtool.search.metaquantnet import MetaQuantNet

Progress = Callable[[str, dict], None]
StepLoss = Callable[[np.random.Generator, int, np.ndarray], torch.Tensor]


def step_loss(ctx: SearchContext, weights: dict[str, torch.Tensor], idx: np.ndarray) -> torch.Tensor:
    """The objective's training loss of the training samples `idx` with `weights` in place."""
    if len(idx) == 0:  # a rank with no sample in a tiny last batch still joins the gradient average
        return sum(w.sum() for w in weights.values()) * 0.0
    with ctx.net.override_weights(weights):
        outs = ctx.forward(ctx.train, idx)
    t = torch.as_tensor(idx, device=ctx.device)
    y = ctx.labels(ctx.train)
    teacher = ctx.teacher_train
    return ctx.objective.train_loss(outs, teacher.rows(t), teacher.energy, None if y is None else y[t])


def run_epochs(
    ctx: SearchContext,
    optimizer: torch.optim.Optimizer,
    epochs: range,
    seed_key: Sequence[int],
    loss_of: StepLoss,
    after_step: Callable[[], None] = lambda: None,
    after_epoch: Callable[[int, float, float], None] = lambda epoch, loss, seconds: None,
    deadline: float | None = None,
) -> bool:
    """Train over `ctx.train` for `epochs`: per epoch a generator seeded with `[*seed_key, epoch]`
    shuffles the samples; each global mini-batch of `training.batch_size` is split across ranks and
    `loss_of(rng, global step, local indices)` gives its loss. `after_epoch(epoch, mean loss, seconds)`.
    Past `deadline` (time.monotonic, agreed by every rank) the epoch ends after the current step and no
    other starts; returns False when that cut training short."""
    n = len(ctx.train)
    bs = min(ctx.cfg.training.batch_size, n)
    steps = math.ceil(n / bs)
    for epoch in epochs:
        t0 = time.time()
        rng = np.random.default_rng([*seed_key, epoch])
        perm = rng.permutation(n)
        total = 0.0
        done = 0
        for s in range(steps):
            idx, share = distributed.local_share(np.sort(perm[s * bs : (s + 1) * bs]))
            loss = loss_of(rng, epoch * steps + s, idx) * share
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_step()
            total += float(loss.detach()) / share if share else 0.0
            done += 1
            if deadline is not None and s + 1 < steps and past_deadline(deadline):
                break
        total = distributed.mean_over_ranks(total, ctx.device)
        after_epoch(epoch, total / done, time.time() - t0)
        if done < steps or (deadline is not None and epoch != epochs[-1] and past_deadline(deadline)):
            return False
    return True


def past_deadline(deadline: float) -> bool:
    """Whether `deadline` has passed, as rank 0 sees it (every rank must stop at the same step)."""
    return bool(distributed.broadcast(time.monotonic() > deadline))


def steps_per_epoch(ctx: SearchContext) -> int:
    n = len(ctx.train)
    return math.ceil(n / min(ctx.cfg.training.batch_size, n))


# ---- MetaQuantNet -------------------------------------------------------------------------------------
def sample_policy(
    widths: list[int], n: int, pins: dict[int, int], rng: np.random.Generator, step: int
) -> list[int]:
    """The random policy of one training step: every 8th step all-lowest, every 8th+4 all-highest, otherwise
    widths drawn around a random level so low-budget regions are visited as often as high ones."""
    if step % 8 == 0:
        bits = [widths[0]] * n
    elif step % 8 == 4:
        bits = [widths[-1]] * n
    else:
        level = rng.integers(0, len(widths))
        idx = np.clip(level + rng.integers(-2, 3, n), 0, len(widths) - 1)
        bits = [widths[i] for i in idx]
    for i, b in pins.items():
        bits[i] = b
    return bits


def build_metaquantnet(ctx: SearchContext) -> MetaQuantNet:
    layers = {
        layer.name: (ctx.net.layers[layer.name].weight.detach(), layer.channel_axis)
        for layer in ctx.info.layers
    }
    widths = sorted(set(ctx.widths) | {b for b in ctx.pins.values() if b != FLOAT})
    return MetaQuantNet(layers, widths, hidden=ctx.cfg.training.hidden, reduce8=ctx.reduce8)


def train_metaquantnet(ctx: SearchContext, progress: Progress, deadline: float | None = None) -> MetaQuantNet:
    """Train once (resuming from the work directory's checkpoint); reused by every budget. Past `deadline`
    (time.monotonic) training stops after the current step."""
    cfg = ctx.cfg
    torch.manual_seed(cfg.seed)
    mqn = build_metaquantnet(ctx).to(ctx.device)
    opt = torch.optim.Adam(mqn.parameters(), lr=cfg.training.lr)
    path = os.path.join(ctx.workdir, "metaquantnet.pt")
    state = None if cfg.restart else checkpoint.load_shared(path, ctx.fp)
    start = 0
    if state is not None:
        mqn.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["epoch"])
        progress("mqn_resume", {"epoch": start})
    # Under torchrun, DistributedDataParallel averages MetaQuantNet's gradients over the ranks; a layer
    # pinned to float has no block in use, hence find_unused_parameters.
    gen = distributed.data_parallel(mqn, any(b == FLOAT for b in ctx.pins.values()))
    ctx.set_activation_quant(tuple([cfg.space.act_bits] * ctx.n))
    progress(
        "mqn_start",
        {
            "epochs": cfg.training.epochs,
            "steps": steps_per_epoch(ctx),
            "params": mqn.parameter_count(),
            "model_params": ctx.info.totals.params + ctx.info.totals.bias_params,
        },
    )

    def loss_of(rng: np.random.Generator, step: int, idx: np.ndarray) -> torch.Tensor:
        # The policy comes from the step's generator: identical on every rank.
        return step_loss(ctx, gen(sample_policy(ctx.widths, ctx.n, ctx.pins, rng, step)), idx)

    def after_epoch(epoch: int, loss: float, seconds: float) -> None:
        checkpoint.save_main(
            path,
            {
                "fingerprint": ctx.fp,
                "epoch": epoch + 1,
                "model": mqn.state_dict(),
                "optimizer": opt.state_dict(),
            },
        )
        progress(
            "mqn_epoch", {"epoch": epoch + 1, "epochs": cfg.training.epochs, "loss": loss, "seconds": seconds}
        )

    if not run_epochs(
        ctx,
        opt,
        range(start, cfg.training.epochs),
        [cfg.seed],
        loss_of,
        after_epoch=after_epoch,
        deadline=deadline,
    ):
        progress("deadline", {"stage": "MetaQuantNet training"})
    return mqn
