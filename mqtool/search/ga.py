"""Evolutionary search over per-layer bit-widths (MetaPruning's scheme), under a linear budget.

A candidate is a vector of indices into the candidate widths (one gene per searchable layer; with
`search_act` a second gene per layer says whether its input activation is quantized; with `options` that
second gene picks one of the layer's storage formats, each with the activation bits it implies). Each generation
keeps the `parents` best, breeds `mutations` children by per-gene mutation and `crossovers` by uniform
crossover, and fills the rest with random candidates. Infeasible candidates are rejected before they are
scored and every score is cached, so a generation only pays for candidates never seen before.

The search is a pure function of its seed and the fitness values: no torch, no I/O. `state()` /
`from_state()` let the caller checkpoint after every generation and resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mqtool.search.config import GAConfig


@dataclass
class Genome:
    """Searchable genes of a policy. `wbits`/`abits` are full per-layer vectors, pins applied; `fmts` the
    per-layer format codes when formats are searched (empty otherwise: the emitter decides)."""

    wbits: tuple[int, ...]
    abits: tuple[int, ...]
    fmts: tuple[int, ...] = ()

    def key(self) -> tuple:
        return self.wbits + self.abits + self.fmts


@dataclass
class GAResult:
    best: Genome
    best_fitness: float
    history: list[dict] = field(default_factory=list)
    evaluated: int = 0


class GeneticSearch:
    """Minimise `fitness` over policies whose cost is <= `limit`."""

    def __init__(
        self,
        n_layers: int,
        widths: list[int],
        cost: Callable[[np.ndarray, np.ndarray], np.ndarray],
        limit: float,
        *,
        pins: dict[int, int] | None = None,
        search_act: bool = False,
        act_widths: tuple[int, int] = (8, 32),
        config: GAConfig | None = None,
        seed: int = 0,
        racing: bool = False,
        options: list[list[tuple[int, int]]] | None = None,
        extra_seeds: list[Genome] | None = None,
    ):
        """`options[i]`: layer i's (format code, activation bits) choices when formats are searched; `cost`
        then takes (wbits, abits, fmts)."""
        self.n = n_layers
        self.widths = np.array(sorted(widths))
        self.cost = cost
        self.limit = limit
        self.pins = dict(pins or {})
        self.search_act = search_act
        self.act_widths = np.array(act_widths)
        self.options = options
        self.extra_seeds = list(extra_seeds or [])
        self._k = None if options is None else np.array([len(o) for o in options])
        self.cfg = config or GAConfig()
        # With racing, `evaluate(new, reference)` also gets the worst parent: a candidate confidently
        # worse than it cannot become a parent, so the evaluator may stop scoring it early.
        self.racing = racing
        self.rng = np.random.default_rng(seed)
        self.cache: dict[tuple, float] = {}
        self.population: list[Genome] = []
        self.generation = 0
        self.history: list[dict] = []

    # ---- candidates -------------------------------------------------------------------------------
    def _genome(self, wi: np.ndarray, ai: np.ndarray) -> Genome:
        w = self.widths[wi].copy()
        for i, b in self.pins.items():
            w[i] = b
        if self.options is not None:
            picks = [self.options[i][int(k)] for i, k in enumerate(ai)]
            return Genome(
                tuple(int(x) for x in w), tuple(int(a) for _, a in picks), tuple(int(f) for f, _ in picks)
            )
        a = self.act_widths[ai].copy() if self.search_act else np.full(self.n, self.act_widths[0])
        return Genome(tuple(int(x) for x in w), tuple(int(x) for x in a))

    def _indices(self, g: Genome) -> tuple[np.ndarray, np.ndarray]:
        wi = np.searchsorted(self.widths, np.array(g.wbits)).clip(0, len(self.widths) - 1)
        if self.options is not None:
            ai = np.array([[f for f, _ in o].index(c) for o, c in zip(self.options, g.fmts)])
            return wi, ai
        ai = (np.array(g.abits) != self.act_widths[0]).astype(int)
        return wi, ai

    def cost_of(self, g: Genome) -> float:
        if self.options is not None:
            return float(self.cost(np.array(g.wbits), np.array(g.abits), np.array(g.fmts)))
        return float(self.cost(np.array(g.wbits), np.array(g.abits)))

    def feasible(self, g: Genome) -> bool:
        return self.cost_of(g) <= self.limit + 1e-9

    def _random(self) -> Genome:
        # Draw around a random "level" so tight budgets still produce feasible candidates quickly.
        level = self.rng.integers(0, len(self.widths))
        spread = self.rng.integers(0, len(self.widths))
        wi = np.clip(level + self.rng.integers(-spread, spread + 1, self.n), 0, len(self.widths) - 1)
        if self.options is not None:
            ai = self.rng.integers(0, self._k)
        else:
            ai = self.rng.integers(0, 2, self.n) if self.search_act else np.zeros(self.n, int)
        return self._genome(wi, ai)

    def _mutate(self, g: Genome) -> Genome:
        wi, ai = self._indices(g)
        mask = self.rng.random(self.n) < self.cfg.mutation_prob
        wi = np.where(mask, self.rng.integers(0, len(self.widths), self.n), wi)
        if self.options is not None:
            amask = self.rng.random(self.n) < self.cfg.mutation_prob
            shift = self.rng.integers(1, np.maximum(self._k, 2))
            ai = np.where(amask & (self._k > 1), (ai + shift) % self._k, ai)
        elif self.search_act:
            amask = self.rng.random(self.n) < self.cfg.mutation_prob
            ai = np.where(amask, 1 - ai, ai)
        return self._genome(wi, ai)

    def _crossover(self, g1: Genome, g2: Genome) -> Genome:
        w1, a1 = self._indices(g1)
        w2, a2 = self._indices(g2)
        take = self.rng.random(self.n) < 0.5
        return self._genome(np.where(take, w1, w2), np.where(take, a1, a2))

    def _fill(self, make: Callable[[], Genome], count: int, seen: set) -> list[Genome]:
        out: list[Genome] = []
        tries = 0
        while len(out) < count and tries < self.cfg.max_tries * max(count, 1):
            tries += 1
            g = make()
            if g.key() in seen or not self.feasible(g):
                continue
            seen.add(g.key())
            out.append(g)
        return out

    def seeds(self) -> list[Genome]:
        """Uniform policies that fit (with formats: each uniform width in each layer's first, second, ...
        format): the GA starts from them."""
        out = []
        kinds = 1 if self._k is None else int(self._k.max())
        for k in range(kinds):
            ai = np.zeros(self.n, int) if self._k is None else np.minimum(k, self._k - 1)
            for wi in range(len(self.widths)):
                g = self._genome(np.full(self.n, wi), ai)
                if self.feasible(g) and g not in out:
                    out.append(g)
        return out + [g for g in self.extra_seeds if self.feasible(g) and g not in out]

    # ---- the loop ---------------------------------------------------------------------------------
    def step(self, evaluate: Callable[..., list[float]]) -> None:
        """Run one generation: breed, score what is new, keep the population sorted by fitness."""
        cfg = self.cfg
        seen = {g.key() for g in self.population}
        if not self.population:
            cands = [g for g in self.seeds() if g.key() not in seen]
            seen.update(g.key() for g in cands)
            cands += self._fill(self._random, cfg.population - len(cands), seen)
        else:
            parents = self.population[: cfg.n_parents]
            cands = list(parents)
            cands += self._fill(
                lambda: self._mutate(parents[self.rng.integers(len(parents))]), cfg.n_mutations, seen
            )
            cands += self._fill(
                lambda: (
                    self._crossover(*(parents[i] for i in self.rng.choice(len(parents), 2, replace=False)))
                    if len(parents) > 1
                    else self._mutate(parents[0])
                ),
                cfg.n_crossovers,
                seen,
            )
            cands += self._fill(self._random, cfg.population - len(cands), seen)
        new = [g for g in cands if g.key() not in self.cache]
        if new:
            ref = (
                self.population[cfg.n_parents - 1]
                if self.racing and len(self.population) >= cfg.n_parents
                else None
            )
            scores = evaluate(new, ref) if ref is not None else evaluate(new)
            for g, f in zip(new, scores):
                if np.isnan(f):  # left unscored (the deadline passed mid-generation): not part of it
                    continue
                self.cache[g.key()] = float(f) if np.isfinite(f) else float("inf")
            cands = [g for g in cands if g.key() in self.cache]
            new = [g for g in new if g.key() in self.cache]
        # Sort by fitness, ties broken by the genes themselves so the order is deterministic.
        self.population = sorted(cands, key=lambda g: (self.cache[g.key()], g.key()))
        best = self.population[0] if self.population else None
        self.history.append(
            {
                "generation": self.generation,
                "evaluated": len(new),
                "cached": len(self.cache),
                "best_fitness": self.cache[best.key()] if best else None,
                "best_cost": self.cost_of(best) if best else None,
            }
        )
        self.generation += 1

    def run(
        self,
        evaluate: Callable[..., list[float]],
        on_generation: Callable[[GeneticSearch], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GAResult:
        """Run the remaining generations; `should_stop()` (asked after each generation, e.g. a deadline)
        ends the search early with the best so far."""
        while self.generation < self.cfg.generations:
            self.step(evaluate)
            if on_generation:
                on_generation(self)
            if should_stop is not None and self.population and should_stop():
                break
        return self.result()

    def result(self) -> GAResult:
        if not self.population:
            raise RuntimeError("the genetic search found no feasible candidate")
        best = self.population[0]
        return GAResult(best, self.cache[best.key()], list(self.history), len(self.cache))

    # ---- checkpoints ------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "generation": self.generation,
            "population": [[list(g.wbits), list(g.abits), list(g.fmts)] for g in self.population],
            # ~1000 entries by the last generation: as two flat byte strings, because pickling them as
            # nested lists (one object per gene) made the per-generation checkpoint cost ~1 s per budget.
            "cache": _pack_cache(self.cache),
            "history": self.history,
            "rng": self.rng.bit_generator.state,
        }

    def load_state(self, state: dict) -> None:
        self.generation = int(state["generation"])
        self.population = [
            Genome(tuple(p[0]), tuple(p[1]), tuple(p[2]) if len(p) > 2 else ()) for p in state["population"]
        ]
        self.cache = _unpack_cache(state["cache"])
        self.history = list(state["history"])
        self.rng.bit_generator.state = state["rng"]


def _pack_cache(cache: dict[tuple, float]) -> dict:
    width = len(next(iter(cache))) if cache else 0  # empty after a generation with no feasible candidate
    keys = np.array(list(cache), dtype=np.int16).reshape(len(cache), width)
    values = np.array(list(cache.values()), dtype=np.float64)
    return {"width": width, "keys": keys.tobytes(), "values": values.tobytes()}


def _unpack_cache(packed: dict | list) -> dict[tuple, float]:
    if isinstance(packed, list):  # checkpoints written before the packed form: [[genes, fitness], ...]
        return {tuple(k): float(v) for k, v in packed}
    values = np.frombuffer(packed["values"], dtype=np.float64)
    keys = np.frombuffer(packed["keys"], dtype=np.int16).reshape(len(values), int(packed["width"]))
    return {tuple(int(x) for x in k): float(v) for k, v in zip(keys, values)}
