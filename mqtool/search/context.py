"""What every stage of the search shares: the prepared float model, its PyTorch twin, the data split into a
training part and a held-out search part, the fp32 teacher's outputs, and activation quantization.

The model is the one the emitter quantizes (`passes.pipeline.prepare`: BN folded, names fixed), so layer
names and float weights agree between search and emission. `convert` hands its already prepared model and
analysis down (`prepared=...`): the model is loaded and prepared once per run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from mqtool import numerics
from mqtool.analysis import ModelInfo, analyze
from mqtool.errors import InputError
from mqtool.policy import FLOAT, LayerBits, Policy
from mqtool.search import checkpoint, distributed
from mqtool.search.config import SearchConfig
from mqtool.search.objective import Objective


@dataclass
class Samples:
    """Model inputs (name -> array, first axis = samples) and optional integer labels."""

    inputs: dict[str, np.ndarray]
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, idx: np.ndarray) -> Samples:
        return Samples({k: v[idx] for k, v in self.inputs.items()}, None if self.y is None else self.y[idx])


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
        self.objective = Objective.choose(
            config.objective.metric, config.objective.temperature, data.y is not None
        )
        self.data = data
        self.train, self.search_set = self._split(data)
        self.net = to_torch(self.model, self.info, channels_last=True).to(self.device)
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.fp = checkpoint.fingerprint(
            checkpoint.model_digest(self.model),
            checkpoint.data_digest(data.inputs, data.y),
            config.fingerprint_parts("metaquantnet"),
        )
        self.teacher_train = self.forward_all(self.train)
        self.teacher_search = self.forward_all(self.search_set)
        self.act_ranges = self._calibrate()
        self._act_plan_cache: dict[tuple, dict[str, int]] = {}
        self._act_key: tuple | None = None

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

    def _split(self, data: Samples) -> tuple[Samples, Samples]:
        n = len(data)
        if n < 4:
            raise InputError(
                f"data: {n} samples are too few to train and search (need at least 4)", field="data"
            )
        perm = np.random.default_rng(self.cfg.seed).permutation(n)
        k = max(1, min(n - 1, int(round(n * self.cfg.data.search_split))))
        # The GA scores candidates on the first `fitness_samples` rows of the search split; the re-ranking
        # and the final fitness use all of it (capped), so the winner is not picked on sampling noise.
        sc = self.cfg.scoring
        keep = max(sc.fitness_samples, sc.rerank_samples if sc.rerank else 0)
        return data.take(np.sort(perm[k:])), data.take(np.sort(perm[:k][:keep]))

    def feeds(self, ds: Samples, idx: slice | np.ndarray | None = None) -> list[torch.Tensor]:
        arrays = [ds.inputs[n] if idx is None else ds.inputs[n][idx] for n in self.info.inputs]
        return [torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in arrays]

    def labels(self, ds: Samples) -> torch.Tensor | None:
        return None if ds.y is None else torch.from_numpy(ds.y).to(self.device)

    @torch.no_grad()
    def forward_all(self, ds: Samples, bs: int = 512) -> torch.Tensor:
        outs = []
        for i in range(0, len(ds), bs):
            outs.append(self.output(self.net(*self.feeds(ds, slice(i, i + bs)))))
        return torch.cat(outs)

    @staticmethod
    def output(y) -> torch.Tensor:
        # The first output is the one the search optimises (logits, embedding, regression output).
        return (y[0] if isinstance(y, tuple | list) else y).float()

    # ---- activation quantization -------------------------------------------------------------------
    def _calibrate(self) -> dict[str, tuple[float, float]]:
        from calibration.calibrate import calibrate
        from passes.qdq_plan import plan_activations

        all8 = Policy.uniform(self.names, 8, self.cfg.space.act_bits)
        tensors = plan_activations(self.model, self.info, all8)
        path = os.path.join(self.workdir, "calibration.pt")
        cached = checkpoint.load_shared(path, self.fp, True)
        if cached is not None:
            return {k: (float(v[0]), float(v[1])) for k, v in cached["ranges"].items()}
        # Calibrated once, on rank 0: every rank must quantize activations with the same ranges.
        ranges = (
            calibrate(self.model, tensors, self.train.inputs, method=self.cfg.data.calibration)
            if distributed.is_main()
            else None
        )
        ranges = distributed.broadcast(ranges)
        checkpoint.save_main(
            path, {"fingerprint": self.fp, "ranges": {k: list(v) for k, v in ranges.items()}}
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
            return  # every GA candidate without search_act shares one plan: nothing to rebuild
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
