"""Scoring candidate policies with the weights MetaQuantNet generates for them (no training per candidate).

Three mechanisms keep a GA's ~1000 candidates cheap without changing which one wins (docs/search.md):
racing (a candidate stops once a paired test says it is worse than the worst parent), screening with float
activations while every candidate shares the activation widths, and a final re-ranking of the best few on
the whole search split.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from mqtool import numerics
from mqtool.search import distributed
from mqtool.search.config import ScoringConfig
from mqtool.search.context import SearchContext
from mqtool.search.costs import dynamic_flags
from mqtool.search.ga import Genome
from mqtool.search.metaquantnet import MetaQuantNet

# Racing: chunks of about this many samples (the first look comes after one chunk: at the default 128
# fitness samples a third of the candidates stop there, -5% GA time; at 800 samples, -50%), and the
# one-sided z of the paired test (about 1 in 160 comparisons of two equally good candidates stops wrongly).
RACE_CHUNK = 64
RACE_Z = 2.5
FIRST_LOOK_BREAK_EVEN = 1 / 3


def worse(terms: np.ndarray, ref: np.ndarray, n: int) -> tuple[bool, float]:
    """(confidently worse than the reference?, mean per-sample difference) from the first len(terms)
    samples, paired with the reference's terms on the same samples."""
    done = len(terms)
    d = terms - ref[:done]
    mean = float(d.mean())
    # Standard error of the mean difference, with the finite-population correction: the search split
    # is all there is, so the error is 0 once every sample is in.
    se = float(d.std(ddof=1)) / math.sqrt(done) * math.sqrt(1 - done / n)
    return mean - RACE_Z * se > 0, mean


def chunks(n: int, size: int) -> list[slice]:
    """`n` rows in ceil(n / size) nearly equal consecutive slices."""
    k = max(1, math.ceil(n / size))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def choose_finalist(
    terms: list[np.ndarray], fits: list[float], keys: list[tuple], used: list[float] | None
) -> int:
    """Index of the winning finalist: the lowest fitness; with `used` (each one's cost under the budget),
    the finalists whose paired per-sample difference to the best is within one standard error count as
    tied with it, and the tied one using the most of the budget wins. Ties in everything go to the genes."""
    i = min(range(len(fits)), key=lambda k: (fits[k], keys[k]))
    n = len(terms[i])
    if used is None or n < 2:
        return i
    tied = [i]
    for k, t in enumerate(terms):
        d = t - terms[i]
        if k != i and float(d.mean()) <= float(d.std(ddof=1)) / math.sqrt(n):
            tied.append(k)
    return max(tied, key=lambda k: (used[k], -fits[k], tuple(-x for x in keys[k])))


Progress = Callable[[str, dict], None]


@dataclass(frozen=True)
class Anchors:
    """Raw fitness values that give the fitness a readable scale (`relative`): uniform 8-bit PTQ reads 0,
    uniform PTQ at the lowest candidate width reads 1."""

    ptq8: float
    ptq_low: float
    low_bits: int

    @property
    def span(self) -> float:
        return self.ptq_low - self.ptq8

    def relative(self, fitness: float) -> float:
        """`fitness` on the anchors' scale; NaN when the objective cannot tell the anchors apart."""
        if not self.informative:
            return float("nan")
        return (fitness - self.ptq8) / self.span

    @property
    def informative(self) -> bool:
        """False when uniform lowest-width PTQ does not score clearly worse than uniform 8-bit PTQ: the
        objective is then blind to quantization (the failure of a re-softmaxed probability output)."""
        return self.span > 1e-6 * max(1.0, abs(self.ptq8)) and np.isfinite(self.span)


class Scorer:
    """Fitness of candidate policies on the search split of `ctx`, with `mqn`'s generated weights."""

    def __init__(self, ctx: SearchContext, progress: Progress, config: ScoringConfig | None = None):
        self.ctx = ctx
        self.cfg = config or ctx.cfg.scoring
        self.progress = progress
        self.mqn: MetaQuantNet | None = None
        # Racing: the per-sample fitness terms of every candidate scored in full on this rank (a
        # reference must be scored in full; see `_score`).
        self.terms: dict[tuple, np.ndarray] = {}
        self.float_screen = False  # see ScoringConfig.exact_screening; set per search
        self.should_stop: Callable[[], bool] | None = None  # the GA's deadline, set while it runs
        self.first_look = True
        self._feed_cache: dict[tuple, list[torch.Tensor]] = {}
        self._labels = ctx.labels(ctx.search_set)
        self._anchors: Anchors | None = None
        self.set_samples(self.cfg.fitness_samples)
        self.race_stats = {"scored": 0, "stopped": 0, "samples": 0, "first_look": 0}

    # ---- whole-split values --------------------------------------------------------------------------
    @torch.no_grad()
    def fitness(self) -> float:
        """The network's fitness as it stands (weights and activation quantizers set) on the whole search
        split. Lower is better; a smooth quantity (accuracy on a few hundred samples saturates)."""
        return self.aggregate(float(self.full_terms().sum()), len(self.ctx.search_set))

    @torch.no_grad()
    def full_terms(self) -> np.ndarray:
        """Per-sample terms on the whole search split, in chunks so memory stays that of one chunk."""
        rows = chunks(len(self.ctx.search_set), RACE_CHUNK)
        return np.concatenate([self.terms_of(self.ctx.forward_feeds(self.feeds(r)), r) for r in rows])

    def terms_of(self, outs: list[torch.Tensor], rows: slice) -> np.ndarray:
        """Per-sample terms of the search samples `rows` (`outs`: the model's outputs for exactly those)."""
        y = None if self._labels is None else self._labels[rows]
        t = self.ctx.teacher_search
        return self.ctx.objective.terms(outs, t.rows(rows), t.energy, y)

    def aggregate(self, total: float, n: int) -> float:
        """The fitness from the sum of the terms of the first `n` search samples."""
        return self.ctx.objective.aggregate(total, n)

    # ---- GA candidates ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, genomes: list[Genome], reference: Genome | None = None) -> list[float]:
        """Fitness of each candidate with the weights MetaQuantNet generates for it (no training).

        With `reference` (the GA's worst parent) and racing on, a candidate is scored chunk by chunk and
        stopped as soon as it is confidently worse than the reference (see `_score`)."""
        assert self.mqn is not None
        ref = reference if self.cfg.racing else None
        # Each rank scores its slice of the candidates; every rank gets all the fitness values back.
        return distributed.gather_slices(genomes, lambda gs: self._evaluate_here(gs, ref))

    def set_float_screening(self, on: bool) -> None:
        """Score GA candidates with float activations (`on`) or with the activation quantization the
        emitter will insert. Only meaningful when every candidate has the same activation widths: then
        8-bit activation noise is common to all of them and barely moves their order (Kendall tau 0.96-0.97
        between the two on the examples), while it costs a third of a candidate's time on the CNN."""
        if on != self.float_screen:
            self.terms.clear()  # racing references must be scored the same way as the candidates
            self.float_screen = on

    def set_samples(self, k: int) -> None:
        """Score GA candidates on the first `k` rows of the search split. Two chunkings: with a first look
        after `RACE_CHUNK` rows (racing), and in chunks twice that size (fewer, faster forward passes)."""
        n = min(len(self.ctx.search_set), k)
        self.plans = {True: chunks(n, RACE_CHUNK), False: chunks(n, 2 * RACE_CHUNK)}
        self.first_look = True
        self._feed_cache.clear()

    def _stopped(self, scored: int) -> bool:
        """Past the GA's deadline (`should_stop`), once this call has scored at least one candidate."""
        return scored > 0 and self.should_stop is not None and self.should_stop()

    def _evaluate_here(self, genomes: list[Genome], reference: Genome | None) -> list[float]:
        # Past the deadline the rest of the generation is left unscored (NaN: the GA drops them), so a
        # generation of slow candidates (a detector fed one image per run) overruns by one candidate at most.
        out: list[float] = []
        if reference is None:
            for g in genomes:
                out.append(math.nan if self._stopped(len(out)) else self._score(g, None, self.plans[False]))
            return out
        if reference.key() not in self.terms:  # after a resume, or scored on another rank
            self._score(reference, None, self.plans[False])
        ref_terms = self.terms[reference.key()]
        before = dict(self.race_stats)
        for g in genomes:
            stop = self._stopped(len(out))
            out.append(math.nan if stop else self._score(g, ref_terms, self.plans[self.first_look]))
        # The first look costs one more, smaller forward pass per candidate and pays only when enough
        # candidates stop there (break-even ~1/3 on the CNN example). Whether they would have is known
        # either way (see `_score`), so the next generation looks first only if this one's rate was high.
        scored = self.race_stats["scored"] - before["scored"]
        if scored:
            rate = (self.race_stats["first_look"] - before["first_look"]) / scored
            self.first_look = rate >= FIRST_LOOK_BREAK_EVEN
        return out

    def _score(self, g: Genome, ref: np.ndarray | None, plan: list[slice]) -> float:
        """Racing (Maron & Moore's Hoeffding races, here with a paired normal test): after each chunk of
        the search split, the candidate's per-sample terms are compared with the reference's on the same
        samples. Paired differences vary far less than the terms themselves (both networks find the same
        samples hard), so most poor candidates are told apart after one chunk. A stopped candidate gets
        the reference's total plus the estimated difference: worse than the reference, so it can never
        become a parent, which is all the GA uses fitness for."""
        ctx = self.ctx
        n = plan[-1].stop
        if self.float_screen:
            ctx.set_activation_quant(None)
        else:
            ctx.set_activation_quant(g.abits, dynamic_flags(g))
        parts: list[np.ndarray] = []
        done = 0
        self.race_stats["scored"] += 1
        with ctx.net.override_weights(self.mqn.generate(list(g.wbits), abits=g.abits)):
            for rows in plan:
                parts.append(self.terms_of(ctx.forward_feeds(self.feeds(rows)), rows))
                done = rows.stop
                if ref is None or done == n:
                    continue
                is_worse, mean = worse(np.concatenate(parts), ref, n)
                if is_worse:
                    self.race_stats["stopped"] += 1
                    self.race_stats["samples"] += done
                    if done <= RACE_CHUNK:
                        self.race_stats["first_look"] += 1
                    return self.aggregate(float(ref.sum()) + mean * n, n)
        terms = np.concatenate(parts)
        self.race_stats["samples"] += n
        if ref is not None and plan[0].stop > RACE_CHUNK and n > RACE_CHUNK:
            # scored without a first look: would it have stopped there?
            self.race_stats["first_look"] += int(worse(terms[:RACE_CHUNK], ref, n)[0])
        self.terms[g.key()] = terms
        return self.aggregate(float(terms.sum()), n)

    def feeds(self, rows: slice) -> list[torch.Tensor]:
        # The GA's chunks are fed ~1000 times per budget: kept as ready tensors (channels-last copies).
        if rows not in self.plans[True] and rows not in self.plans[False]:
            return self.ctx.feeds(self.ctx.search_set, rows)
        key = (rows.start, rows.stop)
        if key not in self._feed_cache:
            self._feed_cache[key] = self.ctx.feeds(self.ctx.search_set, rows)
        return self._feed_cache[key]

    # ---- anchors -------------------------------------------------------------------------------------
    @torch.no_grad()
    def ptq_fitness(self, bits: int) -> float:
        """Fitness of uniform `bits`-bit post-training quantization (pretrained weights, per-channel MSE
        scales, activations as the search quantizes them) on the whole search split."""
        from mqtool.search.metaquantnet import weight_quant_ste

        ctx = self.ctx
        weights = {}
        for layer, reduce in zip(ctx.info.layers, ctx.reduce8):
            w = ctx.net.layers[layer.name].weight.detach()
            s = numerics.weight_scale(w.cpu().numpy(), bits, layer.channel_axis, "mse")
            stored = 7 if bits == 8 and reduce else bits
            weights[layer.name] = weight_quant_ste(
                w, torch.from_numpy(s).to(w.device), bits, layer.channel_axis, stored
            )
        ctx.set_activation_quant(tuple([ctx.cfg.space.act_bits] * ctx.n))
        with ctx.net.override_weights(weights):
            return self.fitness()

    def anchors(self) -> Anchors:
        """The fitness scale a person can read: 0 = uniform 8-bit PTQ, 1 = uniform lowest-width PTQ."""
        if self._anchors is None:
            lo = min(self.ctx.widths)
            self._anchors = Anchors(self.ptq_fitness(8), self.ptq_fitness(lo), lo)
        return self._anchors

    # ---- finalists -----------------------------------------------------------------------------------
    @torch.no_grad()
    def rerank(
        self, finalists: list[Genome], cost: Callable[[Genome], float] | None = None
    ) -> tuple[Genome, float]:
        """The finalist with the lowest fitness on the whole search split. Picking the best of ~800
        candidates on a small sample favours whoever got lucky on it (the winner's curse); a second,
        larger look at the few best removes most of that luck for a few seconds.

        With `cost` (a finalist's cost under the budget), finalists the whole split cannot tell from the best (paired per-sample difference
        within one standard error) count as tied, and the tied one that uses the most of the budget wins:
        at generous budgets the loss saturates, and a winner picked on noise alone can leave bits unused
        (measured: 3.84 of a 4-bit budget)."""
        assert self.mqn is not None
        ctx = self.ctx

        def score(gs: list[Genome]) -> list[np.ndarray]:
            out = []
            for g in gs:
                ctx.set_activation_quant(g.abits, dynamic_flags(g))
                with ctx.net.override_weights(self.mqn.generate(list(g.wbits), abits=g.abits)):
                    out.append(self.full_terms())
            return out

        terms = distributed.gather_slices(finalists, score)
        n = len(ctx.search_set)
        fits = [self.aggregate(float(t.sum()), n) for t in terms]
        used = None
        if cost is not None:
            used = [float(cost(g)) for g in finalists]
        i = choose_finalist(terms, fits, [g.key() for g in finalists], used)
        if len(finalists) > 1:
            self.progress(
                "ga_rerank",
                {
                    "finalists": len(finalists),
                    "samples": n,
                    "fitness": fits[i],
                    "relative": self.anchors().relative(fits[i]),
                    "screened_float": self.float_screen,
                },
            )
        return finalists[i], fits[i]
