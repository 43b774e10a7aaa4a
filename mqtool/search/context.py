"""What every stage of the search shares: the prepared float model, its PyTorch twin, the data split into a
training part, a held-out search part and a held-out check part, the fp32 teacher's outputs, the objective,
and activation quantization.

The model is the one the emitter quantizes (`passes.pipeline.prepare`: BN folded, names fixed), so layer
names and float weights agree between search and emission. `convert` hands its already prepared model and
analysis down (`info=...`): the model is loaded and prepared once per run.

Outputs are sample-major everywhere in the search. How samples go through the twin is probed once: in
batches when the twin gives the same per-sample outputs batched as one at a time (the sample axis of each
output found by comparing a 1-sample and a 2-sample run: time-major `[T, N, C]` outputs have it on axis
1), else one sample per run (models exported with a batch of 1 baked into their reshapes), each run's
output stacked along a new first axis.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from mqtool import numerics
from mqtool.analysis import ModelInfo, analyze
from mqtool.data import model_inputs
from mqtool.errors import InputError
from mqtool.outputs import OutputKind, OutputSpec, classify, output_sample_axes, plan_outputs
from mqtool.policy import FLOAT, LayerBits, Policy
from mqtool.runtime import samples_in, take_samples
from mqtool.search import checkpoint, distributed
from mqtool.search.config import SearchConfig
from mqtool.search.objective import Objective, Teacher

log = logging.getLogger(__name__)

# Samples per forward pass when the teacher's outputs are computed (memory: one chunk's activations).
_CHUNK = 256
# At most this many input elements per forward pass without gradients: a detector's 800 x 608 images run a
# few at a time (a 128-sample chunk of them took 8 GB), MNIST digits in whole chunks. Training keeps every
# activation for the backward pass: its mini-batch holds at most _TRAIN_ELEMENTS (at least 4 samples).
_MAX_ELEMENTS = 2**22
_TRAIN_ELEMENTS = 2**21
# An epoch has >= _MIN_STEPS optimizer steps (mini-batches >= _MIN_BATCH): ddddocr's 224 lines made 2 steps
# of 128, 3 finetuning epochs: KL 0.073 -> 0.056; 14 steps of 16: -> 0.020 (bench/bench_finetune_steps.py).
_MIN_STEPS, _MIN_BATCH = 16, 8
# The check split (held out from training and search, for the self-check on ONNX Runtime): this fraction
# of the data, at most this many samples, and none below this many samples in all.
_CHECK_FRACTION, _CHECK_MAX, _CHECK_MIN_DATA = 0.1, 256, 200


@dataclass
class Samples:
    """Model inputs (name -> array) and optional integer labels. An input's samples lie on its axis in
    `axes` (default 0; axis 1 of a state [layers, N, hidden]); an input whose axis is None is shared (a
    scalar, given once and passed whole)."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray | None = None
    axes: dict[str, int | None] = field(default_factory=dict)

    def __len__(self) -> int:
        counts = (samples_in(v, self.axes.get(k, 0)) for k, v in self.inputs.items())
        return next((c for c in counts if c is not None), 1)

    def take(self, idx: np.ndarray | slice) -> Samples:
        return Samples(
            {k: take_samples(v, self.axes.get(k, 0), idx) for k, v in self.inputs.items()},
            None if self.y is None else self.y[idx],
            self.axes,
        )


class SearchContext:
    """The prepared model and everything derived from it once per run (see the module docstring)."""

    def __init__(
        self,
        model: onnx.ModelProto,
        data: Samples,
        config: SearchConfig,
        workdir: str,
        *,
        info: ModelInfo | None = None,
    ):
        """`model` is prepared here unless `info` (its analysis) is given: then it is taken as prepared."""
        from mqtool.backend import to_torch
        from passes.pipeline import prepare

        self.cfg = config
        self.workdir = workdir
        self.device = distributed.resolve_device(config.device)
        checkpoint.clear_temporaries(workdir)
        # Denormal floats make some training steps 10x slower on x86 (measured: a 3-epoch finetune took
        # 3.4-36 s without this, 3-4 s with it). It is a process-wide CPU flag: `api` restores it when a
        # search returns.
        torch.set_flush_denormal(True)
        if info is None:
            model = prepare(model)
            info = analyze(model)
        self.model = model
        self.info: ModelInfo = info
        if not self.info.layers:
            raise InputError(
                "model: no quantizable layer (Conv, ConvTranspose, Gemm, MatMul with a constant)",
                field="model",
            )
        self.names = self.info.names
        self.n = len(self.names)
        self.pins = self._resolve_pins(config.space.pins)
        self.widths = list(config.space.widths)
        if not data.axes:
            data = Samples(data.inputs, data.y, {s.name: s.sample_axis for s in model_inputs(model)})
        self.data = data
        self.sample_elements = max(1, sum(int(np.prod(v.shape[1:])) for v in data.inputs.values()))
        self.max_batch = max(1, _MAX_ELEMENTS // self.sample_elements)
        self._chunk = max(1, min(_CHUNK, 4 * self.max_batch))  # samples materialised at once
        self.train, self.search_set, self.check_set = self._split(data)
        steps = max(_MIN_BATCH, -(-len(self.train) // _MIN_STEPS))
        cap = min(max(4, _TRAIN_ELEMENTS // self.sample_elements), steps)
        if cap < config.training.batch_size and "batch_size" not in config.plan.fixed:
            why = f"memory of {self.sample_elements}-element inputs, {len(self.train)} training samples"
            log.info("training mini-batch %d -> %d samples (%s)", config.training.batch_size, cap, why)
            self.cfg = config = config.replace(batch_size=cap)
        self.net = to_torch(self.model, self.info, channels_last=True).to(self.device)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.fp = checkpoint.fingerprint(
            checkpoint.model_digest(self.model),
            checkpoint.data_digest(data.inputs, data.y),
            config.fingerprint_parts("metaquantnet"),
        )
        self.plans = plan_outputs(self.model)
        self._sources = [p.source for p in self.plans]
        self._probe_feeding()
        self.unreached = self._pin_unreached_layers()
        self.outputs, self.objective = self._choose_objective()
        self.teacher_train = self.teacher(self.train)
        self.teacher_search = self.teacher(self.search_set, self.teacher_train.energy)
        self.act_ranges = self._calibrate()
        self._act_plan_cache: dict[tuple, dict[str, int]] = {}
        self._act_key: tuple | None = None
        self.reduce8 = self._reduced_eight_bit_layers()

    @property
    def metric(self) -> str:
        return self.objective.metric

    # ---- setup -----------------------------------------------------------------------------------
    def _resolve_pins(self, pins: dict[str, int]) -> dict[int, int]:
        out = {}
        for name, bits in pins.items():
            if name not in self.names:
                raise InputError(
                    f"space.pins: no quantizable layer named '{name}' (see mqtool inspect)",
                    field="space.pins",
                )
            out[self.names.index(name)] = bits
        return out

    def _split(self, data: Samples) -> tuple[Samples, Samples, Samples]:
        """(train, search, check). The check split (the last samples of the permutation) is held out of
        everything the search does, for the self-check; small data sets have none."""
        n = len(data)
        if n < 4:
            raise InputError(
                f"data: {n} samples are too few to train and search (need at least 4)", field="data"
            )
        perm = np.random.default_rng(self.cfg.seed).permutation(n)
        c = min(_CHECK_MAX, int(round(n * _CHECK_FRACTION))) if n >= _CHECK_MIN_DATA else 0
        k = max(1, min(n - c - 1, int(round(n * self.cfg.data.search_split))))
        # The GA scores candidates on the first `fitness_samples` rows of the search split; the re-ranking
        # and the final fitness use all of it (capped), so the winner is not picked on sampling noise.
        sc = self.cfg.scoring
        keep = max(sc.fitness_samples, sc.rerank_samples if sc.rerank else 0)
        return (
            data.take(np.sort(perm[k : n - c])),
            data.take(np.sort(perm[:k][:keep])),
            data.take(np.sort(perm[n - c :])),
        )

    # ---- running the twin --------------------------------------------------------------------------
    def _probe_feeding(self) -> None:
        """Batched or one sample per run (module docstring), and each output's sample axis when batched."""
        ds = self.train
        self.batched = False
        self._out_axes: list[int | None] = []
        self._scored = list(range(len(self.plans)))
        if len(ds) < 2:
            return
        with torch.no_grad():
            try:
                one = self._raw(self.feeds(ds, slice(0, 1)))
                other = self._raw(self.feeds(ds, slice(1, 2)))
                two = self._raw(self.feeds(ds, slice(0, 2)))
                axes = output_sample_axes([tuple(o.shape) for o in one], [tuple(o.shape) for o in two])
            except (RuntimeError, InputError, ValueError, IndexError) as e:
                log.info("the twin does not run batched (%s): one sample per run", e)
                return
            for a, b, both, axis in zip(one, other, two, axes):
                if axis is None:
                    continue
                want = torch.cat([a, b], dim=axis)
                if not torch.allclose(both, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
                    log.info("batched outputs differ from one-at-a-time outputs: one sample per run")
                    return
        self.batched, self._out_axes = True, axes
        self._scored = [i for i, a in enumerate(axes) if a is not None]

    def _raw(self, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """The twin's outputs (the float source of each graph output) for one run."""
        if self._sources == self.net.output_names:
            y = self.net(*feeds)
            return list(y) if isinstance(y, tuple | list) else [y]
        got = self.net.run(dict(zip(self.net.input_names, feeds)), self._sources)
        return [got[s] for s in self._sources]

    def forward(self, ds: Samples, idx: slice | np.ndarray) -> list[torch.Tensor]:
        """Sample-major outputs (float) of the scored outputs for samples `idx` of `ds`."""
        return self.forward_feeds(self.feeds(ds, idx))

    def forward_feeds(self, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        keep = self._scored
        if self.batched:
            runs = self._runs(feeds, self.max_batch) if not torch.is_grad_enabled() else [feeds]
            if len(runs) > 1:  # bounded memory (see _MAX_ELEMENTS)
                return [torch.cat(p) for p in zip(*(self.forward_feeds(r) for r in runs))]
            outs = self._raw(feeds)
            return [torch.movedim(outs[i], self._out_axes[i], 0).float() for i in keep]
        runs = [self._raw(one) for one in self._one_by_one(feeds)]
        return [torch.stack([r[i] for r in runs]).float() for i in keep]

    @torch.no_grad()
    def _pin_unreached_layers(self) -> list[str]:
        """Layers inside a control-flow body that no training sample runs (an If branch the data never takes,
        e.g. silero-vad's 8 kHz branch with 16 kHz audio) cost nothing in fitness, so the GA would give them
        the lowest width and the file would be poor on the inputs that do take them. They are pinned to the
        highest width (unless pinned by the user) and named in the progress."""
        inside = [i for i, layer in enumerate(self.info.layers) if layer.subgraph and i not in self.pins]
        if not inside:
            return []
        seen: set[str] = set()
        wanted = [self.info.layers[i].output for i in inside]
        feeds = self.feeds(self.train, slice(0, min(len(self.train), 64 if self.batched else 16)))
        runs = [feeds] if self.batched else self._one_by_one(feeds)
        for run in runs:
            got = self.net.run(dict(zip(self.net.input_names, run)), wanted)
            seen |= {t for t, v in got.items() if v is not None}
        unreached = [i for i in inside if self.info.layers[i].output not in seen]
        for i in unreached:
            self.pins[i] = max(self.widths)
        return [self.names[i] for i in unreached]

    def _runs(self, feeds: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
        """`feeds` cut into runs of at most `size` samples on each input's sample axis (a state's is 1;
        shared inputs are fed whole to every run)."""
        axes = [self.data.axes.get(n, 0) for n in self.info.inputs]
        axes = [a if a is not None and f.dim() > a else None for f, a in zip(feeds, axes)]
        n = next((f.shape[a] for f, a in zip(feeds, axes) if a is not None), 1)
        return [
            [f if a is None else f.narrow(a, j, min(size, n - j)) for f, a in zip(feeds, axes)]
            for j in range(0, n, size)
        ]

    def _one_by_one(self, feeds: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return self._runs(feeds, 1)

    def feeds(self, ds: Samples, idx: slice | np.ndarray | None = None) -> list[torch.Tensor]:
        arrays = [
            ds.inputs[n] if idx is None else take_samples(ds.inputs[n], ds.axes.get(n, 0), idx)
            for n in self.info.inputs
        ]
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    def labels(self, ds: Samples) -> torch.Tensor | None:
        return None if ds.y is None else torch.from_numpy(ds.y).to(self.device)

    @torch.no_grad()
    def forward_all(self, ds: Samples, bs: int | None = None) -> list[torch.Tensor]:
        """Sample-major outputs of every sample of `ds` (scored outputs only)."""
        bs = bs or self._chunk
        parts = [self.forward(ds, slice(i, i + bs)) for i in range(0, len(ds), bs)]
        return [torch.cat(p) for p in zip(*parts)]

    # ---- objective ---------------------------------------------------------------------------------
    def _choose_objective(self) -> tuple[list[OutputSpec], Objective]:
        """Each output's kind from the graph and the fp32 values of the first training samples, then the
        objective over the scored ones. The first scored output is the one labels apply to."""
        # 64 samples in one batched run; one sample per run costs a full pass each (a 416x416 detector:
        # ~0.3 s), and 16 tell the output kinds apart as well
        feeds = self.feeds(self.train, slice(0, min(len(self.train), 64 if self.batched else 16)))
        with torch.no_grad():
            if self.batched:
                outs = self._raw(feeds)
                values = {
                    p.name: None if ax is None else torch.movedim(o, ax, 0).float().cpu().numpy()
                    for p, o, ax in zip(self.plans, outs, self._out_axes)
                }
            else:
                runs = [self._raw(one) for one in self._one_by_one(feeds)]
                values = {
                    p.name: torch.stack([r[i] for r in runs]).float().cpu().numpy()
                    for i, p in enumerate(self.plans)
                }
        obj = self.cfg.objective
        specs = classify(self.plans, values, metric=obj.metric, weights=obj.output_weights)
        self._scored = [i for i, s in enumerate(specs) if s.kind is not OutputKind.NONE]
        first = values[specs[self._scored[0]].name]
        objective = Objective.choose(
            [specs[i] for i in self._scored],
            obj.metric,
            obj.temperature,
            self.data.y is not None,
            first.shape[1:],
        )
        return specs, objective

    def teacher(self, ds: Samples, energy: list | None = None) -> Teacher:
        """The objective's stored form of the fp32 outputs on `ds`, computed chunk by chunk. A regression
        output's error is normalised by `energy` (default: the variance in the first chunk of `ds`)."""
        parts = []
        with torch.no_grad():
            for i in range(0, len(ds), self._chunk):
                parts.append(self.objective.teacher(self.forward(ds, slice(i, i + self._chunk))))
        merged = [
            tuple(torch.cat([p.parts[k][j] for p in parts]) for j in range(len(parts[0].parts[k])))
            if isinstance(parts[0].parts[k], tuple)
            else torch.cat([p.parts[k] for p in parts])
            for k in range(len(parts[0].parts))
        ]
        return Teacher(merged, len(ds), parts[0].energy if energy is None else energy)

    # ---- activation quantization -------------------------------------------------------------------
    def _calibrate(self) -> dict[str, tuple[float, float]]:
        from calibration.calibrate import calibrate
        from passes.subgraph_qdq import plan_model

        # every tensor that carries a quantizer in the all-8-bit plan, carried ones too: one of them can need
        # its own quantizer under another policy, and a tensor without a range would stay float unnoticed
        all8 = Policy.uniform(self.names, 8, self.cfg.space.act_bits)
        tensors = plan_model(self.model, self.info, all8).merged().all_bits()
        path = os.path.join(self.workdir, "calibration.pt")
        cached = checkpoint.load_shared(path, self.fp, True)
        self.calibration_s = 0.0  # timed (emission calibrates again: the planner's reserve); 0 if cached
        if cached is not None:
            return {k: (float(v[0]), float(v[1])) for k, v in cached["ranges"].items()}
        t0 = time.perf_counter()
        # Calibrated once, on rank 0: every rank must quantize activations with the same ranges.
        ranges = (
            calibrate(
                self.model,
                tensors,
                self.train.inputs,
                method=self.cfg.data.calibration,
                subgraph_reader=self.net.read_tensors,  # tensors inside If/Loop bodies (not on ORT)
            )
            if distributed.is_main()
            else None
        )
        ranges = distributed.broadcast(ranges)
        self.calibration_s = time.perf_counter() - t0
        doc = {"fingerprint": self.fp, "ranges": {k: list(v) for k, v in ranges.items()}}
        checkpoint.save_main(path, doc)
        return ranges

    def _reduced_eight_bit_layers(self) -> list[bool]:
        """Per layer: does emission store its 8-bit weights at 7 bits (integer kernels, quantized input)?
        Asked of the emitter's own storage plan, so the simulation follows whatever it decides."""
        from passes.subgraph_qdq import plan_model, plan_model_storage

        act = self.cfg.space.act_bits
        if act == FLOAT:
            return [False] * self.n
        pol = Policy.uniform(self.names, 8, act)
        layout = plan_model_storage(
            self.model, self.info, pol, plan_model(self.model, self.info, pol).merged().all_bits()
        )
        return [name in layout and layout[name].bits == 7 for name in self.names]

    def act_plan(self, abits: tuple[int, ...]) -> dict[str, int]:
        from passes.subgraph_qdq import plan_model

        key = tuple(abits)
        if key not in self._act_plan_cache:
            pol = Policy({n: LayerBits(8, a) for n, a in zip(self.names, abits)})
            self._act_plan_cache[key] = plan_model(self.model, self.info, pol).merged().bits
        return self._act_plan_cache[key]

    def set_activation_quant(self, abits: tuple[int, ...] | None, dynamic: tuple[bool, ...] = ()) -> None:
        """Fake-quantize exactly the activation tensors the emitter will put Q/DQ on (None: all float), and
        the inputs of the layers flagged in `dynamic` (format `dynamic`) as their kernel does at run time."""
        from mqtool.backend.fake_quant import ActFakeQuant

        self.net.set_dynamic_inputs([n for n, on in zip(self.names, dynamic) if on])
        plan = self.act_plan(abits) if abits is not None else {}
        key = tuple(sorted(plan.items()))
        if key == self._act_key:
            return  # every GA candidate without search_act shares one plan: nothing to rebuild
        if missing := [t for t in plan if t not in self.act_ranges]:
            log.warning(
                "no calibrated range for %d planned tensors (e.g. %s): float", len(missing), missing[0]
            )
        for tensor in self.act_ranges:
            if tensor in plan:
                scale, zp = numerics.activation_qparams(*self.act_ranges[tensor], plan[tensor])
                self.net.set_act_quant(tensor, ActFakeQuant(plan[tensor], float(scale), int(zp)))
            else:
                self.net.set_act_quant(tensor, None)
        self._act_key = key

    def policy_abits(self, policy: Policy) -> tuple[int, ...]:
        """Per-layer activation bits of `policy` (a float layer has a float input)."""
        return tuple(
            policy.get(n).act_bits if policy.get(n).weight_bits != FLOAT else FLOAT for n in self.names
        )
