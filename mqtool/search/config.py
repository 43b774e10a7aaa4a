"""Every option of the search, as typed, frozen, nested configs validated at construction.

`SearchConfig` groups the options by the stage they steer: the search space, the data split and calibration,
the objective, MetaQuantNet's training, the GA, candidate scoring, finetuning. Which checkpoints an option
invalidates follows from its group (`fingerprint_parts`): a later search with other GA, scoring or finetune
settings reuses the trained MetaQuantNet. The whole config round-trips through JSON (`to_json` /
`from_json`) and is written into the policy's `meta`, so a run can be reproduced from its output file.

Errors name the config field (`space.widths`), never a command-line flag: the CLI maps fields to flags.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args

from mqtool.errors import InputError
from mqtool.policy import FLOAT

Metric = Literal["ce", "kl", "cosine", "sqnr"]
Calibration = Literal["minmax", "percentile", "entropy", "mse"]
Device = Literal["auto", "cpu", "cuda"]

CONFIG_VERSION = 1


def _fail(name: str, message: str) -> InputError:
    return InputError(f"{name}: {message}", field=name)


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise _fail(name, f"expected an integer {bound}, got {value!r}")


def _check_float(name: str, value: Any, lo: float, hi: float, open_lo: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or value > hi or (open_lo and value == lo):
        raise _fail(name, f"expected a number in {'(' if open_lo else '['}{lo:g}, {hi:g}], got {value!r}")


def _check_choice(name: str, value: Any, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise _fail(name, f"'{value}' is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class SpaceConfig:
    """What the GA may choose: candidate weight widths, the activation width, pinned layers."""

    widths: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    act_bits: int = 8
    search_act: bool = False  # also decide per layer whether its input activation is quantized
    pins: Mapping[str, int] = field(default_factory=dict)  # layer name -> weight bits (2..8 or 32)

    def __post_init__(self) -> None:
        widths = tuple(self.widths)
        if not widths or any(
            isinstance(w, bool) or not isinstance(w, int) or not 2 <= w <= 8 for w in widths
        ):
            raise _fail("space.widths", f"candidate widths must be integers in 2..8, got {list(widths)}")
        object.__setattr__(self, "widths", tuple(sorted(set(widths))))
        if self.act_bits not in (2, 3, 4, 5, 6, 7, 8, FLOAT):
            raise _fail("space.act_bits", f"must be 2..8 or 32, got {self.act_bits!r}")
        for name, bits in dict(self.pins).items():
            if bits not in (2, 3, 4, 5, 6, 7, 8, FLOAT):
                raise _fail("space.pins", f"{name}={bits}: bits must be 2..8 or 32")
        object.__setattr__(self, "pins", dict(self.pins))


@dataclass(frozen=True)
class DataConfig:
    """How `data` is split (a held-out part scores candidates) and how activation ranges are calibrated."""

    search_split: float = 0.2
    calibration: Calibration = "percentile"

    def __post_init__(self) -> None:
        _check_float("data.search_split", self.search_split, 0.0, 1.0, open_lo=True)
        if self.search_split >= 1.0:
            raise _fail("data.search_split", f"{self.search_split} must be between 0 and 1")
        _check_choice("data.calibration", self.calibration, Calibration)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The one objective that drives MetaQuantNet training, GA fitness and finetuning."""

    metric: Metric | None = (
        None  # None: "ce" with labels on a classifier, else "kl" (each output by its kind)
    )
    temperature: float = 2.0  # of the distillation of logits
    output_weights: Mapping[str, float] = field(
        default_factory=dict
    )  # graph output -> weight (0: not scored)

    def __post_init__(self) -> None:
        if self.metric is not None:
            _check_choice("objective.metric", self.metric, Metric)
        _check_float("objective.temperature", self.temperature, 0.0, 1e6, open_lo=True)
        for name, w in dict(self.output_weights).items():
            _check_float(f"objective.output_weights[{name}]", w, 0.0, 1e6)
        object.__setattr__(self, "output_weights", dict(self.output_weights))


@dataclass(frozen=True)
class TrainingConfig:
    """MetaQuantNet's training (once per model, data and space). `batch_size` is the global mini-batch of
    both MetaQuantNet training and finetuning (split across torchrun ranks)."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 3e-3
    hidden: int = 8  # width of each MetaQuantNet block's MLP

    def __post_init__(self) -> None:
        _check_int("training.epochs", self.epochs, 0, 10_000)
        _check_int("training.batch_size", self.batch_size, 1)
        _check_float("training.lr", self.lr, 0.0, 10.0, open_lo=True)
        _check_int("training.hidden", self.hidden, 1, 4096)


@dataclass(frozen=True)
class GAConfig:
    """MetaPruning's evolutionary scheme: per generation the `parents` best, `mutations` mutated children,
    `crossovers` uniform crossovers, the rest random. Left unset (None), the three follow the population
    (a fifth of it, half, half: 10/25/25 at the default 50), so a smaller population, given or planned by
    the time budget, also breeds fewer candidates per generation (with the fixed 25 + 25 a planned
    population of 24 scored 50 new candidates a generation: twice the planned GA time)."""

    population: int = 50
    generations: int = 20
    parents: int | None = None
    mutations: int | None = None
    crossovers: int | None = None
    mutation_prob: float = 0.1
    max_tries: int = 20  # give up filling a generation after this many rejected draws per slot
    # The hybrid (default): the first generation also holds the allocation that minimises the summed
    # per-layer PTQ sensitivity under the budget (a HAWQ-style prior, `mqtool.sensitivity`); the GA then
    # refines it with MetaQuantNet's fitness. False: the paper's pure method (uniform + random seeds).
    sensitivity_seed: bool = True

    def __post_init__(self) -> None:
        _check_int("ga.population", self.population, 2)
        _check_int("ga.generations", self.generations, 1)
        for name in ("parents", "mutations", "crossovers"):
            if getattr(self, name) is not None:
                _check_int(f"ga.{name}", getattr(self, name), 1 if name == "parents" else 0)
        _check_float("ga.mutation_prob", self.mutation_prob, 0.0, 1.0)
        _check_int("ga.max_tries", self.max_tries, 1)

    @property
    def n_parents(self) -> int:
        return self.parents if self.parents is not None else max(2, round(self.population / 5))

    @property
    def n_mutations(self) -> int:
        return self.mutations if self.mutations is not None else max(1, round(self.population / 2))

    @property
    def n_crossovers(self) -> int:
        return self.crossovers if self.crossovers is not None else max(1, round(self.population / 2))


@dataclass(frozen=True)
class ScoringConfig:
    """How GA candidates are scored on the search split (docs/search.md)."""

    fitness_samples: int = 128  # search samples each GA candidate is scored on
    racing: bool = True  # stop scoring a candidate once it is confidently worse than every parent
    rerank: int = 10  # the GA's best this many are re-scored on the whole search split; the best wins
    rerank_samples: int = 1024  # cap on the search split used for re-ranking and final fitness values
    # GA candidates are screened with float activations while activation widths are fixed (a third less
    # time per candidate on the CNN example, ranking unchanged within noise: docs/search.md); the rerank
    # finalists and every reported fitness use the activations as emitted. True: screen with them too.
    exact_screening: bool = False

    def __post_init__(self) -> None:
        _check_int("scoring.fitness_samples", self.fitness_samples, 1)
        _check_int("scoring.rerank", self.rerank, 0)
        _check_int("scoring.rerank_samples", self.rerank_samples, 1)


@dataclass(frozen=True)
class FinetuneConfig:
    """Quantization-aware, distilled finetuning of the chosen policy."""

    epochs: int = 3
    lr: float = 5e-4
    # Where finetuning starts: "auto" scores the policy with MetaQuantNet's weights and with the pretrained
    # weights (PTQ, MSE scales) on the search split and starts from the better; an undertrained
    # MetaQuantNet (a short time budget on a large model) must not cost the result its PTQ quality.
    start: str = "auto"

    def __post_init__(self) -> None:
        _check_int("finetune.epochs", self.epochs, 0, 10_000)
        _check_float("finetune.lr", self.lr, 0.0, 10.0, open_lo=True)
        if self.start not in ("auto", "metaquantnet", "ptq"):
            raise InputError(
                f"finetune.start: expected auto, metaquantnet or ptq, got {self.start!r}",
                field="finetune.start",
            )


@dataclass(frozen=True)
class DeployConfig:
    """Where the emitted model will run, for latency budgets: ONNX Runtime CPU at this batch and thread
    count (the latency table is measured that way)."""

    latency_batch: int = 1
    threads: int = 2

    def __post_init__(self) -> None:
        _check_int("deploy.latency_batch", self.latency_batch, 1, 65536)
        _check_int("deploy.threads", self.threads, 1, 1024)


@dataclass(frozen=True)
class PlanConfig:
    """The time budget of a whole run (`mqtool/search/plan.py`). `time_budget` (minutes) None: no plan,
    the configured values as they are. `fixed`: flat option names the user set, which the plan never
    changes."""

    time_budget: float | None = None
    fixed: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.time_budget is not None:
            _check_float("plan.time_budget", self.time_budget, 0.0, 1e6, open_lo=True)
        object.__setattr__(self, "fixed", frozenset(self.fixed))


_SECTIONS: dict[str, type] = {
    "space": SpaceConfig,
    "data": DataConfig,
    "objective": ObjectiveConfig,
    "training": TrainingConfig,
    "ga": GAConfig,
    "scoring": ScoringConfig,
    "finetune": FinetuneConfig,
    "plan": PlanConfig,
    "deploy": DeployConfig,
}

# What each checkpoint depends on. MetaQuantNet (and the calibration) depend on the model, the data and
# these sections, except the number of epochs: its learning rate is constant and each epoch has its own
# random stream, so a checkpoint after k epochs is exactly where a longer run would be (a run planned for
# more epochs resumes it). The GA of a budget also depends on its own settings. Finetuning, the time plan,
# the device and `restart` never change a checkpoint's content.
_MQN_SECTIONS = ("space", "data", "objective", "training")
_GA_SECTIONS = ("ga", "scoring", "deploy")


@dataclass(frozen=True)
class SearchConfig:
    """Every option of the search; a new option is a new field of the section it belongs to."""

    space: SpaceConfig = field(default_factory=SpaceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    ga: GAConfig = field(default_factory=GAConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    deploy: DeployConfig = field(default_factory=DeployConfig)
    seed: int = 0
    device: Device = "auto"  # auto (CUDA when available) | cpu | cuda
    restart: bool = False  # ignore (and overwrite) checkpoints in the work directory

    def __post_init__(self) -> None:
        for name, kind in _SECTIONS.items():
            if not isinstance(getattr(self, name), kind):
                raise _fail(name, f"expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
        _check_int("seed", self.seed, 0)
        _check_choice("device", self.device, Device)

    # ---- flat names ----------------------------------------------------------------------------------
    @classmethod
    def flat(cls, **options: Any) -> SearchConfig:
        """A config from flat option names (`epochs=2, population=8, finetune_epochs=1`, see `FLAT`)."""
        return cls().replace(**options)

    def replace(self, **options: Any) -> SearchConfig:
        """A copy with the given flat options changed (unknown names are a TypeError, as in a call)."""
        by_section: dict[str, dict[str, Any]] = {}
        top: dict[str, Any] = {}
        for name, value in options.items():
            if name not in FLAT:
                raise TypeError(f"SearchConfig has no option {name!r}")
            section, leaf = FLAT[name]
            if section is None:
                top[leaf] = value
            else:
                by_section.setdefault(section, {})[leaf] = value
        for section, changes in by_section.items():
            top[section] = replace(getattr(self, section), **changes)
        return replace(self, **top)

    # ---- fingerprints and JSON -------------------------------------------------------------------------
    def fingerprint_parts(self, what: Literal["metaquantnet", "ga"]) -> dict[str, Any]:
        """The options a checkpoint of `what` depends on (MetaQuantNet/calibration, or a budget's GA)."""
        doc = self.to_json()
        parts = {s: doc[s] for s in _MQN_SECTIONS} | {"seed": self.seed}
        parts["training"] = {k: v for k, v in parts["training"].items() if k != "epochs"}
        if what == "ga":
            parts |= {s: doc[s] for s in _GA_SECTIONS}
        return parts

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["space"]["widths"] = list(self.space.widths)
        doc["space"]["pins"] = dict(sorted(self.space.pins.items()))
        doc["objective"]["output_weights"] = dict(sorted(self.objective.output_weights.items()))
        doc["plan"]["fixed"] = sorted(self.plan.fixed)
        return {"version": CONFIG_VERSION, **doc}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SearchConfig:
        """Inverse of `to_json`; unknown keys are an error (a config from a newer mqtool)."""
        doc = dict(doc)
        version = doc.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise _fail(
                "version", f"search config version {version} is not supported (want {CONFIG_VERSION})"
            )
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in doc:
                continue
            value = doc.pop(f.name)
            if f.name in _SECTIONS:
                section = _SECTIONS[f.name]
                known = {x.name for x in fields(section)}
                extra = set(value) - known
                if extra:
                    raise _fail(f.name, f"unknown option(s) {', '.join(sorted(extra))}")
                if f.name == "space" and "widths" in value:
                    value = {**value, "widths": tuple(value["widths"])}
                if f.name == "plan" and "fixed" in value:
                    value = {**value, "fixed": frozenset(value["fixed"])}
                value = section(**value)
            kw[f.name] = value
        if doc:
            raise _fail("config", f"unknown option(s) {', '.join(sorted(doc))}")
        return cls(**kw)


def _flat_names() -> dict[str, tuple[str | None, str]]:
    """Flat option name -> (section, field). A field keeps its own name unless two sections share it
    (then the section prefixes it: `finetune_epochs`, `finetune_lr`)."""
    out: dict[str, tuple[str | None, str]] = {}
    for section, kind in _SECTIONS.items():
        for f in fields(kind):
            name = f.name if section != "finetune" else f"finetune_{f.name}"
            assert name not in out, name
            out[name] = (section, f.name)
    for f in fields(SearchConfig):
        if f.name not in _SECTIONS:
            out[f.name] = (None, f.name)
    return out


FLAT: dict[str, tuple[str | None, str]] = _flat_names()
"""Flat option names (what the CLI's flags are called, without dashes) -> (section, field)."""
