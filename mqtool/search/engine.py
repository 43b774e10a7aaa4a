"""The search method end to end: train MetaQuantNet once, run a genetic search per budget, finetune.

`SearchEngine` holds what every stage shares: the prepared float model (BN folded, names fixed: the same
model the emitter quantizes), its PyTorch twin, the data split into a training part and a held-out search
part, the fp32 teacher's outputs, and the calibrated activation ranges. Every stage reports progress
through a callback (the CLI draws it) and checkpoints to the work directory.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from mqtool import numerics
from mqtool.analysis import ModelInfo, analyze
from mqtool.errors import InputError
from mqtool.policy import FLOAT, LayerBits, Policy, average_weight_bits, bitops_ratio
from mqtool.search import checkpoint, distributed
from mqtool.search.budgets import Budget, BudgetCost, feasible_range
from mqtool.search.ga import GAConfig, GeneticSearch, Genome
from mqtool.search.metaquantnet import MetaQuantNet, weight_quant_ste

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]
METRICS = ("ce", "kl", "cosine", "sqnr")


@dataclass
class SearchConfig:
    """Every option of the search; a new option is a new field (the CLI maps flags onto these)."""

    widths: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: int = 8
    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    hidden: int = 8
    temperature: float = 2.0
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    metric: str | None = None  # default: "ce" with labels, "kl" without
    search_act: bool = False
    pins: dict[str, int] = field(default_factory=dict)
    search_split: float = 0.2
    fitness_samples: int = 128  # search samples each GA candidate is scored on
    racing: bool = True  # stop scoring a candidate early once it is confidently worse than every parent
    rerank: int = 10  # the GA's best this many are re-scored on the whole search split; the best wins
    rerank_samples: int = 1024  # cap on the search split used for re-ranking and final fitness values
    # GA candidates are screened with float activations while activation widths are fixed (a third less
    # time per candidate on the CNN example, ranking unchanged within noise: docs/search.md); the rerank
    # finalists and every reported fitness use the activations as emitted. True: screen with them too.
    exact_screening: bool = False
    seed: int = 0
    calibration: str = "percentile"
    finetune_epochs: int = 3
    finetune_lr: float = 5e-4
    restart: bool = False
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda

    def ga(self) -> GAConfig:
        return GAConfig(
            self.population,
            self.generations,
            self.parents,
            self.mutations,
            self.crossovers,
            self.mutation_prob,
        )


@dataclass
class Samples:
    """Model inputs (name -> array, first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> Samples:
        return Samples({k: v[idx] for k, v in self.inputs.items()}, None if self.y is None else self.y[idx])


@dataclass
class BudgetResult:
    budget: Budget
    policy: Policy
    fitness: float
    avg_bits: float
    bitops_ratio: float
    evaluated: int
    seconds: float
    note: str = ""


def _noop(event: str, info: dict) -> None:
    pass


# Options that do not change MetaQuantNet's training or the calibration: a later search with other GA or
# finetune settings reuses the trained MetaQuantNet. The GA checkpoint is fingerprinted with _GA_FIELDS.
_GA_FIELDS = (
    "population",
    "generations",
    "parents",
    "mutations",
    "crossovers",
    "mutation_prob",
    "fitness_samples",
    "racing",
    "rerank",
    "rerank_samples",
    "exact_screening",
)
_NOT_IN_MQN_FINGERPRINT = {*_GA_FIELDS, "finetune_epochs", "finetune_lr", "restart", "device"}


class SearchEngine:
    def __init__(
        self,
        model: onnx.ModelProto,
        data: Samples,
        config: SearchConfig,
        workdir: str,
        progress: Progress | None = None,
    ):
        from mqtool.backend import to_torch
        from passes.pipeline import prepare

        self.cfg = config
        self.workdir = workdir
        self.progress = progress or _noop
        self.device = distributed.resolve_device(config.device)
        if distributed.is_main():
            os.makedirs(workdir, exist_ok=True)
            for f in os.listdir(workdir):  # temp files of a killed run (outputs are renamed into place)
                if f.startswith(".") and f.endswith(".tmp"):
                    os.unlink(os.path.join(workdir, f))
        torch.set_flush_denormal(True)
        self.model = prepare(model)
        self.info: ModelInfo = analyze(self.model)
        if not self.info.layers:
            raise InputError(
                "model: no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a constant)"
            )
        self.names = self.info.names
        self.n = len(self.names)
        self.pins = self._resolve_pins(config.pins)
        self.widths = sorted(set(config.widths))
        if not self.widths or min(self.widths) < 2 or max(self.widths) > 8:
            raise InputError(f"--widths: candidate widths must be in 2..8, got {list(config.widths)}")
        self.metric = config.metric or ("ce" if data.y is not None else "kl")
        if self.metric not in METRICS:
            raise InputError(f"--metric: '{self.metric}' is not one of {', '.join(METRICS)}")
        if self.metric == "ce" and data.y is None:
            raise InputError("--metric ce needs labels: the data file has no 'y' array")
        self.data = data
        self._split(data)
        self.net = to_torch(self.model, self.info, channels_last=True).to(self.device)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.fp = checkpoint.fingerprint(
            _model_digest(self.model),
            _data_digest(data),
            {k: v for k, v in asdict(config).items() if k not in _NOT_IN_MQN_FINGERPRINT},
        )
        self.teacher_train = self._forward_all(self.train)
        self.teacher_search = self._forward_all(self.search_set)
        self.act_ranges = self._calibrate()
        self._act_plan_cache: dict[tuple, dict[str, int]] = {}
        self._act_key: tuple | None = None
        self.mqn: MetaQuantNet | None = None
        # Racing: the per-sample fitness terms of every candidate scored in full on this rank (a
        # reference must be scored in full; see `_score`).
        self._terms: dict[tuple, np.ndarray] = {}
        self._float_screen = False  # see SearchConfig.exact_screening; set per search
        self._feed_cache: dict[tuple, list[torch.Tensor]] = {}
        self._set_ga_samples(self.cfg.fitness_samples)
        self.race_stats = {"scored": 0, "stopped": 0, "samples": 0, "first_look": 0}

    # ---- setup -----------------------------------------------------------------------------------
    def _resolve_pins(self, pins: dict[str, int]) -> dict[int, int]:
        out = {}
        for name, bits in pins.items():
            if name not in self.names:
                raise InputError(
                    f"--pin {name}={bits}: no quantizable layer named '{name}' (see mqtool inspect)"
                )
            if bits not in (2, 3, 4, 5, 6, 7, 8, FLOAT):
                raise InputError(f"--pin {name}={bits}: bits must be 2..8 or 32")
            out[self.names.index(name)] = bits
        return out

    def _split(self, data: Samples) -> None:
        n = len(data)
        if n < 4:
            raise InputError(f"--data: {n} samples are too few to train and search (need at least 4)")
        if not 0.0 < self.cfg.search_split < 1.0:
            raise InputError(f"--search-split: {self.cfg.search_split} must be between 0 and 1")
        perm = np.random.default_rng(self.cfg.seed).permutation(n)
        k = max(1, min(n - 1, int(round(n * self.cfg.search_split))))
        # The GA scores candidates on the first `fitness_samples` rows of the search split; the re-ranking
        # and the final fitness use all of it (capped), so the winner is not picked on sampling noise.
        keep = max(self.cfg.fitness_samples, self.cfg.rerank_samples if self.cfg.rerank else 0)
        self.search_set = data.take(np.sort(perm[:k][:keep]))
        self.train = data.take(np.sort(perm[k:]))

    def _feeds(self, ds: Samples, idx: slice | np.ndarray | None = None) -> list[torch.Tensor]:
        names = self.info.inputs
        arrays = [ds.inputs[n] if idx is None else ds.inputs[n][idx] for n in names]
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    def _labels(self, ds: Samples) -> torch.Tensor | None:
        return None if ds.y is None else torch.from_numpy(ds.y).to(self.device)

    def _load(self, path: str, fp: str, restart_on_corrupt: bool = False) -> dict | None:
        """Rank 0 reads the checkpoint and sends it to the others (nodes need no shared disk)."""
        if distributed.world() == 1:
            return checkpoint.load(path, fp, restart_on_corrupt)
        box: tuple = ("ok", None)
        if distributed.is_main():
            try:
                box = ("ok", checkpoint.load(path, fp, restart_on_corrupt))
            except InputError as e:  # every rank must fail the same way, or the others hang
                box = ("error", str(e))
        box = distributed.broadcast(box)
        if box[0] == "error":
            raise InputError(box[1])
        return box[1]

    @staticmethod
    def _save(path: str, state: dict) -> None:
        if distributed.is_main():
            checkpoint.save(path, state)

    def _local(self, idx: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's share of a global mini-batch and the factor that makes the ranks' averaged
        gradients equal the gradient of the loss averaged over the whole batch (unequal shares included)."""
        n = distributed.world()
        if n == 1:
            return idx, 1.0
        mine = idx[distributed.rank() :: n]
        return mine, len(mine) * n / max(1, len(idx))

    @torch.no_grad()
    def _forward_all(self, ds: Samples, bs: int = 512) -> torch.Tensor:
        outs = []
        for i in range(0, len(ds), bs):
            outs.append(self._out(self.net(*self._feeds(ds, slice(i, i + bs)))))
        return torch.cat(outs)

    @staticmethod
    def _out(y) -> torch.Tensor:
        # The first output is the one the search optimises (logits, embedding, regression output).
        return (y[0] if isinstance(y, tuple | list) else y).float()

    def _calibrate(self) -> dict[str, tuple[float, float]]:
        from calibration.calibrate import calibrate
        from passes.qdq_plan import plan_activations

        all8 = Policy.uniform(self.names, 8, self.cfg.act_bits)
        tensors = plan_activations(self.model, self.info, all8)
        cached = self._load(os.path.join(self.workdir, "calibration.pt"), self.fp, True)
        if cached is not None:
            return {k: (float(v[0]), float(v[1])) for k, v in cached["ranges"].items()}
        # Calibrated once, on rank 0: every rank must quantize activations with the same ranges.
        ranges = (
            calibrate(self.model, tensors, self.train.inputs, method=self.cfg.calibration)
            if distributed.is_main()
            else None
        )
        ranges = distributed.broadcast(ranges)
        self._save(
            os.path.join(self.workdir, "calibration.pt"),
            {"fingerprint": self.fp, "ranges": {k: list(v) for k, v in ranges.items()}},
        )
        return ranges

    def act_plan(self, abits: tuple[int, ...]) -> dict[str, int]:
        from passes.qdq_plan import plan_activations

        key = tuple(abits)
        if key not in self._act_plan_cache:
            pol = Policy({n: LayerBits(8, a) for n, a in zip(self.names, abits)})
            self._act_plan_cache[key] = plan_activations(self.model, self.info, pol)
        return self._act_plan_cache[key]

    def set_activation_quant(self, abits: tuple[int, ...] | None) -> None:
        """Fake-quantize exactly the activation tensors the emitter will put Q/DQ on (None: all float)."""
        from mqtool.backend.fake_quant import ActFakeQuant

        plan = self.act_plan(abits) if abits is not None else {}
        key = tuple(sorted(plan.items()))
        if key == self._act_key:
            return  # every GA candidate without --search-act shares one plan: nothing to rebuild
        for tensor in self.act_ranges:
            if tensor in plan:
                scale, zp = numerics.activation_qparams(*self.act_ranges[tensor], plan[tensor])
                self.net.set_act_quant(tensor, ActFakeQuant(plan[tensor], float(scale), int(zp)))
            else:
                self.net.set_act_quant(tensor, None)
        self._act_key = key

    # ---- losses ----------------------------------------------------------------------------------
    def _kd(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.cfg.temperature
        if student.dim() < 2:
            return F.mse_loss(student, teacher)
        s = F.log_softmax(student.flatten(1) / t, dim=-1)
        q = F.log_softmax(teacher.flatten(1) / t, dim=-1)
        return F.kl_div(s, q, log_target=True, reduction="batchmean") * t * t

    def _train_loss(self, out: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        if self.metric in ("cosine", "sqnr"):
            return F.mse_loss(out, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
        loss = self._kd(out, teacher)
        if y is not None:
            loss = loss + F.cross_entropy(out.flatten(1), y)
        return loss

    def _step_loss(self, weights: dict[str, torch.Tensor], idx: np.ndarray, y_all: torch.Tensor | None):
        if len(idx) == 0:  # a rank with no sample in a tiny last batch still joins the gradient average
            return sum(w.sum() for w in weights.values()) * 0.0
        with self.net.override_weights(weights):
            out = self._out(self.net(*self._feeds(self.train, idx)))
        t = torch.as_tensor(idx, device=self.device)
        return self._train_loss(out, self.teacher_train[t], None if y_all is None else y_all[t])

    @torch.no_grad()
    def _fitness(self) -> float:
        """The network's fitness as it stands (weights and activation quantizers set) on the whole search
        split. Lower is better; a smooth quantity (accuracy on a few hundred samples saturates)."""
        return self._aggregate(float(self._full_terms().sum()), len(self.search_set))

    @torch.no_grad()
    def _full_terms(self) -> np.ndarray:
        """Per-sample terms on the whole search split, in chunks so memory stays that of one chunk."""
        rows = _chunks(len(self.search_set), _RACE_CHUNK)
        return np.concatenate([self._terms_of(self._out(self.net(*self._search_feeds(r))), r) for r in rows])

    def _terms_of(self, out: torch.Tensor, rows: slice) -> np.ndarray:
        """Per-sample terms (float64) whose sum the fitness is a monotone increasing function of, for the
        search samples `rows` (`out` holds the model's outputs for exactly those rows)."""
        t = self.teacher_search[rows]
        if self.metric == "ce":
            v = F.cross_entropy(out.flatten(1), self._labels(self.search_set)[rows], reduction="none")
        elif self.metric == "kl":
            if out.dim() < 2:
                v = (out - t).pow(2)
            else:
                tau = self.cfg.temperature
                s = F.log_softmax(out.flatten(1) / tau, dim=-1)
                q = F.log_softmax(t.flatten(1) / tau, dim=-1)
                v = F.kl_div(s, q, log_target=True, reduction="none").sum(1)
        elif self.metric == "cosine":
            v = 1 - F.cosine_similarity(out.flatten(1), t.flatten(1), dim=1)
        else:  # sqnr: the noise energy per sample
            v = (out - t).pow(2).flatten(1).sum(1) if out.dim() > 1 else (out - t).pow(2)
        return v.detach().cpu().double().numpy()

    def _aggregate(self, total: float, n: int) -> float:
        """The fitness from the sum of the terms of the first `n` search samples."""
        if self.metric == "sqnr":
            signal = float(self.teacher_search[:n].double().pow(2).sum())
            return -10 * math.log10(signal / max(total, 1e-20))
        return total / n

    # ---- MetaQuantNet ----------------------------------------------------------------------------
    def _sample_policy(self, rng: np.random.Generator, step: int) -> list[int]:
        w = self.widths
        if step % 8 == 0:
            bits = [w[0]] * self.n  # all-lowest, regularly
        elif step % 8 == 4:
            bits = [w[-1]] * self.n  # all-highest, regularly
        else:
            # Centre the draw on a random level so low-budget regions are visited as often as high ones.
            level = rng.integers(0, len(w))
            idx = np.clip(level + rng.integers(-2, 3, self.n), 0, len(w) - 1)
            bits = [w[i] for i in idx]
        for i, b in self.pins.items():
            bits[i] = b
        return bits

    def _build_mqn(self) -> MetaQuantNet:
        layers = {
            layer.name: (self.net.layers[layer.name].weight.detach(), layer.channel_axis)
            for layer in self.info.layers
        }
        widths = sorted(set(self.widths) | {b for b in self.pins.values() if b != FLOAT})
        return MetaQuantNet(layers, widths, hidden=self.cfg.hidden)

    def train_metaquantnet(self) -> MetaQuantNet:
        """Train once (resuming from the work directory's checkpoint); reused by every budget."""
        torch.manual_seed(self.cfg.seed)
        mqn = self._build_mqn().to(self.device)
        opt = torch.optim.Adam(mqn.parameters(), lr=self.cfg.lr)
        path = os.path.join(self.workdir, "metaquantnet.pt")
        state = None if self.cfg.restart else self._load(path, self.fp)
        start = 0
        if state is not None:
            mqn.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
            self.progress("mqn_resume", {"epoch": start})
        # Under torchrun, DistributedDataParallel averages MetaQuantNet's gradients over the ranks; a layer
        # pinned to float has no block in use, hence find_unused_parameters.
        gen = _ddp(mqn, any(b == FLOAT for b in self.pins.values()))
        n = len(self.train)
        bs = min(self.cfg.batch_size, n)
        steps = math.ceil(n / bs)
        y_all = self._labels(self.train)
        self.set_activation_quant(tuple([self.cfg.act_bits] * self.n))
        self.progress(
            "mqn_start",
            {
                "epochs": self.cfg.epochs,
                "steps": steps,
                "params": mqn.parameter_count(),
                "model_params": self.info.totals.params + self.info.totals.bias_params,
            },
        )
        for epoch in range(start, self.cfg.epochs):
            t0 = time.time()
            # Per-epoch generators: a resumed run replays exactly the epochs an uninterrupted one would.
            rng = np.random.default_rng([self.cfg.seed, epoch])
            perm = rng.permutation(n)
            total = 0.0
            for s in range(steps):
                # The policy comes from the step's generator: identical on every rank.
                idx, share = self._local(np.sort(perm[s * bs : (s + 1) * bs]))
                bits = self._sample_policy(rng, epoch * steps + s)
                weights = gen(bits)
                loss = self._step_loss(weights, idx, y_all) * share
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) / share if share else 0.0
            total = _mean_over_ranks(total, self.device)
            self._save(
                path,
                {
                    "fingerprint": self.fp,
                    "epoch": epoch + 1,
                    "model": mqn.state_dict(),
                    "optimizer": opt.state_dict(),
                },
            )
            self.progress(
                "mqn_epoch",
                {
                    "epoch": epoch + 1,
                    "epochs": self.cfg.epochs,
                    "loss": total / steps,
                    "seconds": time.time() - t0,
                },
            )
        self.mqn = mqn
        return mqn

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
        if on != self._float_screen:
            self._terms.clear()  # racing references must be scored the same way as the candidates
            self._float_screen = on

    def _set_ga_samples(self, k: int) -> None:
        """Score GA candidates on the first `k` rows of the search split. Two chunkings: with a first look
        after `_RACE_CHUNK` rows (racing), and in chunks twice that size (fewer, faster forward passes)."""
        n = min(len(self.search_set), k)
        self._plans = {True: _chunks(n, _RACE_CHUNK), False: _chunks(n, 2 * _RACE_CHUNK)}
        self._first_look = True
        self._feed_cache.clear()

    def _evaluate_here(self, genomes: list[Genome], reference: Genome | None) -> list[float]:
        if reference is None:
            return [self._score(g, None, self._plans[False]) for g in genomes]
        if reference.key() not in self._terms:  # after a resume, or scored on another rank
            self._score(reference, None, self._plans[False])
        ref_terms = self._terms[reference.key()]
        before = dict(self.race_stats)
        out = [self._score(g, ref_terms, self._plans[self._first_look]) for g in genomes]
        # The first look costs one more, smaller forward pass per candidate and pays only when enough
        # candidates stop there (break-even ~1/3 on the CNN example). Whether they would have is known
        # either way (see `_score`), so the next generation looks first only if this one's rate was high.
        scored = self.race_stats["scored"] - before["scored"]
        if scored:
            rate = (self.race_stats["first_look"] - before["first_look"]) / scored
            self._first_look = rate >= _FIRST_LOOK_BREAK_EVEN
        return out

    def _score(self, g: Genome, ref: np.ndarray | None, plan: list[slice]) -> float:
        """Racing (Maron & Moore's Hoeffding races, here with a paired normal test): after each chunk of
        the search split, the candidate's per-sample terms are compared with the reference's on the same
        samples. Paired differences vary far less than the terms themselves (both networks find the same
        samples hard), so most poor candidates are told apart after one chunk. A stopped candidate gets
        the reference's total plus the estimated difference: worse than the reference, so it can never
        become a parent, which is all the GA uses fitness for."""
        n = plan[-1].stop
        self.set_activation_quant(None if self._float_screen else g.abits)
        parts: list[np.ndarray] = []
        done = 0
        self.race_stats["scored"] += 1
        with self.net.override_weights(self.mqn.generate(list(g.wbits))):
            for rows in plan:
                feeds = self._search_feeds(rows)
                parts.append(self._terms_of(self._out(self.net(*feeds)), rows))
                done = rows.stop
                if ref is None or done == n:
                    continue
                worse, mean = _worse(np.concatenate(parts), ref, n)
                if worse:
                    self.race_stats["stopped"] += 1
                    self.race_stats["samples"] += done
                    if done <= _RACE_CHUNK:
                        self.race_stats["first_look"] += 1
                    return self._aggregate(float(ref.sum()) + mean * n, n)
        terms = np.concatenate(parts)
        self.race_stats["samples"] += n
        if ref is not None and plan[0].stop > _RACE_CHUNK and n > _RACE_CHUNK:
            # scored without a first look: would it have stopped there?
            self.race_stats["first_look"] += int(_worse(terms[:_RACE_CHUNK], ref, n)[0])
        self._terms[g.key()] = terms
        return self._aggregate(float(terms.sum()), n)

    def _search_feeds(self, rows: slice) -> list[torch.Tensor]:
        # The GA's chunks are fed ~1000 times per budget: kept as ready tensors (channels-last copies).
        if rows not in self._plans[True] and rows not in self._plans[False]:
            return self._feeds(self.search_set, rows)
        key = (rows.start, rows.stop)
        if key not in self._feed_cache:
            self._feed_cache[key] = self._feeds(self.search_set, rows)
        return self._feed_cache[key]

    # ---- genetic search --------------------------------------------------------------------------
    def _abits_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        a = np.full(self.n, self.cfg.act_bits, dtype=np.float64)
        hi = np.full(self.n, FLOAT if self.cfg.search_act else self.cfg.act_bits, dtype=np.float64)
        return a, hi

    def check_budget(self, budget: Budget) -> tuple[float, float]:
        """(lowest, highest) value of this budget's measure reachable with the candidate widths."""
        cost = BudgetCost(budget.kind, self.info.layers)
        alo, ahi = self._abits_bounds()
        lo, hi = feasible_range(cost, self.widths, self.pins, alo, ahi, self.n)
        if budget.value < lo - 1e-9:
            unit = "average weight bits" if budget.kind == "bits" else "x uniform w8a8 BitOPs"
            raise InputError(
                f"--target-{budget.kind} {budget.value:g}: infeasible; with widths {self.widths} and the pins "
                f"the feasible range is {lo:.3f}..{hi:.3f} {unit}"
            )
        return lo, hi

    def search(self, budget: Budget) -> BudgetResult:
        assert self.mqn is not None, "train_metaquantnet first"
        t0 = time.time()
        lo, hi = self.check_budget(budget)
        cost = BudgetCost(budget.kind, self.info.layers)
        if budget.value >= hi - 1e-9:
            bits = [self.pins.get(i, max(self.widths)) for i in range(self.n)]
            g = Genome(tuple(bits), tuple([self.cfg.act_bits] * self.n))
            policy = self._policy(g, budget, self._rerank([g])[1], 1)
            note = f"budget {budget.value:g} is above what is needed ({hi:.3f}): every layer gets {max(self.widths)} bits"
            return self._result(budget, policy, time.time() - t0, 1, note)
        ga = GeneticSearch(
            self.n,
            self.widths,
            cost,
            budget.value,
            pins=self.pins,
            search_act=self.cfg.search_act,
            act_widths=(self.cfg.act_bits, FLOAT),
            config=self.cfg.ga(),
            seed=self.cfg.seed,
            racing=self.cfg.racing,
        )
        self._first_look = True
        self.set_float_screening(not (self.cfg.exact_screening or self.cfg.search_act or not self.cfg.rerank))
        path = os.path.join(self.workdir, f"ga-{budget.label}.pt")
        gfp = checkpoint.fingerprint(self.fp, budget.label, {k: getattr(self.cfg, k) for k in _GA_FIELDS})
        state = None if self.cfg.restart else self._load(path, gfp)
        if state is not None:
            ga.load_state(state["ga"])
            # A resumed search must race exactly as the uninterrupted one: same chunking, and the
            # parents' per-sample terms as they were computed (not recomputed in other batch sizes).
            self._first_look = bool(state.get("first_look", True))
            for key, terms in state.get("parent_terms", []):
                self._terms[tuple(key)] = np.asarray(terms, dtype=np.float64).copy()
            self.progress("ga_resume", {"generation": ga.generation, "budget": budget.label})

        def on_generation(g: GeneticSearch) -> None:
            ga_state = g.state()
            if distributed.world() > 1:
                distributed.same_on_every_rank(checkpoint.fingerprint(ga_state), "the GA population")
            parents = [p.key() for p in g.population[: g.cfg.parents]]
            kept = [[list(k), torch.from_numpy(self._terms[k])] for k in parents if k in self._terms]
            self._save(
                path,
                {"fingerprint": gfp, "ga": ga_state, "first_look": self._first_look, "parent_terms": kept},
            )
            h = g.history[-1]
            self.progress(
                "ga_generation",
                {**h, "budget": budget.label, "generation": g.generation, "generations": g.cfg.generations},
            )

        res = ga.run(self.evaluate, on_generation)
        best, fitness = res.best, res.best_fitness
        if self.cfg.rerank:
            best, fitness = self._rerank(ga.population[: self.cfg.rerank], cost)
        policy = self._policy(best, budget, fitness, res.evaluated)
        return self._result(budget, policy, time.time() - t0, res.evaluated, "")

    @torch.no_grad()
    def _rerank(self, finalists: list[Genome], cost: BudgetCost | None = None) -> tuple[Genome, float]:
        """The finalist with the lowest fitness on the whole search split. Picking the best of ~800
        candidates on a small sample favours whoever got lucky on it (the winner's curse); a second,
        larger look at the few best removes most of that luck for a few seconds.

        With `cost`, finalists the whole split cannot tell from the best (paired per-sample difference
        within one standard error) count as tied, and the tied one that uses the most of the budget wins:
        at generous budgets the loss saturates, and a winner picked on noise alone can leave bits unused
        (measured: 3.84 of a 4-bit budget)."""
        assert self.mqn is not None

        def score(gs: list[Genome]) -> list[np.ndarray]:
            out = []
            for g in gs:
                self.set_activation_quant(g.abits)
                with self.net.override_weights(self.mqn.generate(list(g.wbits))):
                    out.append(self._full_terms())
            return out

        terms = distributed.gather_slices(finalists, score)
        n = len(self.search_set)
        fits = [self._aggregate(float(t.sum()), n) for t in terms]
        i = min(range(len(finalists)), key=lambda k: (fits[k], finalists[k].key()))
        if cost is not None and n > 1:
            tied = [i]
            for k, t in enumerate(terms):
                d = t - terms[i]
                if k != i and float(d.mean()) <= float(d.std(ddof=1)) / math.sqrt(n):
                    tied.append(k)
            used = {k: float(cost(np.array(finalists[k].wbits), np.array(finalists[k].abits))) for k in tied}
            i = max(tied, key=lambda k: (used[k], -fits[k], tuple(-x for x in finalists[k].key())))
        if len(finalists) > 1:
            self.progress(
                "ga_rerank",
                {
                    "finalists": len(finalists),
                    "samples": n,
                    "fitness": fits[i],
                    "screened_float": self._float_screen,
                },
            )
        return finalists[i], fits[i]

    def _policy(self, g: Genome, budget: Budget, fitness: float, evaluated: int) -> Policy:
        layers = {
            n: LayerBits(w, a if w != FLOAT else FLOAT) for n, w, a in zip(self.names, g.wbits, g.abits)
        }
        return Policy(
            layers,
            meta={
                "budget": {"kind": budget.kind, "value": budget.value},
                "fitness": {"metric": self.metric, "value": fitness},
                "seed": self.cfg.seed,
                "evaluated": evaluated,
            },
        )

    def _result(
        self, budget: Budget, policy: Policy, seconds: float, evaluated: int, note: str
    ) -> BudgetResult:
        return BudgetResult(
            budget,
            policy,
            policy.meta["fitness"]["value"],
            average_weight_bits(policy, self.info.layers),
            bitops_ratio(policy, self.info.layers),
            evaluated,
            seconds,
            note,
        )

    # ---- finetuning ------------------------------------------------------------------------------
    def finetune(self, policy: Policy, epochs: int | None = None, start: str = "metaquantnet"):
        """Quantization-aware training of one policy: (`QuantParams` for the emitter, final fitness).

        `start` is "metaquantnet" (the weights MetaQuantNet generates for the policy) or "ptq" (the
        pretrained weights with MSE scales: the uniform-QAT baselines). Weights, per-channel scales and
        biases are trained with distillation; the network's own parameters are restored afterwards.
        """
        from passes.qparams import ActParams, LayerParams, QuantParams

        epochs = self.cfg.finetune_epochs if epochs is None else epochs
        wbits = [policy.get(n).weight_bits for n in self.names]
        abits = tuple(
            policy.get(n).act_bits if policy.get(n).weight_bits != FLOAT else FLOAT for n in self.names
        )
        with torch.no_grad():
            gen = self.mqn.generate_float(wbits) if start == "metaquantnet" and self.mqn is not None else {}
        weights, scales, axes = {}, {}, {}
        biases = {}
        for layer, b in zip(self.info.layers, wbits):
            if b == FLOAT:
                continue
            q = self.net.layers[layer.name]
            if layer.name in gen:
                w, s = gen[layer.name]
            else:
                w = q.weight.detach()
                s = torch.from_numpy(numerics.weight_scale(w.cpu().numpy(), b, layer.channel_axis, "mse"))
                s = s.to(self.device)
            weights[layer.name] = torch.nn.Parameter(w.detach().clone())
            scales[layer.name] = torch.nn.Parameter(s.detach().clone())
            axes[layer.name] = (b, layer.channel_axis)
            if q.bias is not None:
                biases[layer.name] = q.bias
        saved_bias = {n: p.detach().clone() for n, p in biases.items()}
        for p in biases.values():
            p.requires_grad_(True)
        opt = torch.optim.Adam(
            [
                {"params": list(weights.values()) + list(biases.values())},
                {"params": list(scales.values()), "lr": self.cfg.finetune_lr * 0.1},
            ],
            lr=self.cfg.finetune_lr,
        )
        self.set_activation_quant(abits)

        trainable = _Finetuned(weights, scales, axes, biases)
        current = _ddp(trainable, False)

        n = len(self.train)
        bs = min(self.cfg.batch_size, n)
        steps = math.ceil(n / bs)
        y_all = self._labels(self.train)
        total_steps = max(1, epochs * steps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps))
        )
        try:
            for epoch in range(epochs):
                rng = np.random.default_rng([self.cfg.seed, 1_000_003, epoch])
                perm = rng.permutation(n)
                total = 0.0
                for s in range(steps):
                    idx, share = self._local(np.sort(perm[s * bs : (s + 1) * bs]))
                    loss = self._step_loss(current(), idx, y_all) * share
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    with torch.no_grad():
                        for sc in scales.values():
                            sc.clamp_(min=float(numerics.MIN_SCALE))
                    total += float(loss.detach()) / share if share else 0.0
                total = _mean_over_ranks(total, self.device)
                self.progress("finetune_epoch", {"epoch": epoch + 1, "epochs": epochs, "loss": total / steps})
            with torch.no_grad(), self.net.override_weights(trainable()):
                fitness = self._fitness()
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
        plan = self.act_plan(abits)
        acts = {t: ActParams(range=self.act_ranges[t]) for t in plan if t in self.act_ranges}
        return QuantParams(layers=layers, activations=acts), fitness


# Racing: chunks of about this many samples (the first look comes after one chunk: at the default 128
# fitness samples a third of the candidates stop there, -5% GA time; at 800 samples, -50%), and the
# one-sided z of the paired test (about 1 in 160 comparisons of two equally good candidates stops wrongly).
_RACE_CHUNK = 64
_RACE_Z = 2.5
_FIRST_LOOK_BREAK_EVEN = 1 / 3


def _worse(terms: np.ndarray, ref: np.ndarray, n: int) -> tuple[bool, float]:
    """(confidently worse than the reference?, mean per-sample difference) from the first len(terms)
    samples, paired with the reference's terms on the same samples."""
    done = len(terms)
    d = terms - ref[:done]
    mean = float(d.mean())
    # Standard error of the mean difference, with the finite-population correction: the search split
    # is all there is, so the error is 0 once every sample is in.
    se = float(d.std(ddof=1)) / math.sqrt(done) * math.sqrt(1 - done / n)
    return mean - _RACE_Z * se > 0, mean


def _chunks(n: int, size: int) -> list[slice]:
    """`n` rows in ceil(n / size) nearly equal consecutive slices."""
    k = max(1, math.ceil(n / size))
    edges = [round(i * n / k) for i in range(k + 1)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _model_digest(model: onnx.ModelProto) -> str:
    """Part by part: a model over 2 GiB cannot be serialised whole, but each tensor and node can."""
    import hashlib

    h = hashlib.sha256()
    g = model.graph
    for part in (
        model.opset_import,
        model.functions,
        g.input,
        g.output,
        g.node,
        g.initializer,
        g.sparse_initializer,
    ):
        h.update(str(len(part)).encode())
        for item in part:
            h.update(item.SerializeToString(deterministic=True))
    return h.hexdigest()


def _data_digest(data: Samples) -> str:
    import hashlib

    h = hashlib.sha256()
    for k in sorted(data.inputs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(data.inputs[k]).tobytes())
    if data.y is not None:
        h.update(np.ascontiguousarray(data.y).tobytes())
    return h.hexdigest()


class _Finetuned(nn.Module):
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


def _ddp(module: nn.Module, find_unused: bool):
    """`module` itself in one process; wrapped in DistributedDataParallel under torchrun."""
    if distributed.world() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next(module.parameters()).device
    return DistributedDataParallel(
        module,
        device_ids=[dev] if dev.type == "cuda" else None,
        find_unused_parameters=find_unused,
        forward_sync_buffers=False,  # the buffers (pretrained weights, PTQ scales) never change
    )


def _mean_over_ranks(x: float, device: torch.device) -> float:
    if distributed.world() == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t[0]) / distributed.world()
