"""What a budget costs a policy: average weight bits and BitOPs (linear in the bits), and bytes of the emitted
file and ONNX Runtime latency (per layer, the (bits, format) chosen, plus what is not a layer).

Size and latency depend on each layer's storage format as much as on its bits (a 4-bit weight in an INT8
container costs what an 8-bit one does), so under those budgets the GA also chooses each layer's format
among what the layer can be emitted as (`passes.qdq_plan.allowed_formats`), each with the activation bits
it implies: `int8` runs integer kernels on a quantized input, `packed` and `nbits` are weight-only,
`dynamic` runs integer kernels on an input it quantizes itself at run time (float in the graph).
"""

from __future__ import annotations

import numpy as np

from mqtool.errors import InputError
from mqtool.policy import FLOAT, Format
from mqtool.search.budgets import TABLE_KINDS, Budget, BudgetCost, TableCost, feasible_range
from mqtool.search.context import SearchContext
from mqtool.weight_layers import WEIGHT_ONLY_OPS

# Format codes of the GA's format genes (0: none chosen, the emitter's storage mode decides).
FORMATS = {1: Format.INT8, 2: Format.PACKED, 3: Format.NBITS, 4: Format.DYNAMIC}
FORMAT_CODES = {f: c for c, f in FORMATS.items()}


def dynamic_flags(g) -> tuple[bool, ...]:
    """Per layer, whether genome `g` puts it in format `dynamic` (its input then quantized at run time)."""
    return tuple(FORMATS.get(c) is Format.DYNAMIC for c in g.fmts)


# Bytes kept free under a size budget for what the policy's metadata gains after the check (the finetuned
# fitness, the max-drop record) and is written into the file with it.
_META_SLACK = 512
_UNITS = {"bits": "average weight bits", "bitops": "x uniform w8a8 BitOPs", "size": "bytes", "latency": "ms"}


class BudgetCosts:
    """The cost functions of one model's budgets (built once per kind)."""

    def __init__(self, ctx: SearchContext):
        self.ctx = ctx
        self._tables: dict[str, TableCost] = {}
        self.latency_table = None  # set by the caller for latency budgets (mqtool.latency)
        self.metadata_priced = False

    def _abits_bounds(self) -> tuple[np.ndarray, np.ndarray]:
        space = self.ctx.cfg.space
        a = np.full(self.ctx.n, space.act_bits, dtype=np.float64)
        hi = np.full(self.ctx.n, FLOAT if space.search_act else space.act_bits, dtype=np.float64)
        return a, hi

    def check(self, budget: Budget) -> tuple[float, float]:
        """(lowest, highest) value of this budget's measure reachable with the candidate widths (and, for
        size and latency, the formats each layer can take)."""
        ctx = self.ctx
        if budget.kind in TABLE_KINDS:
            lo, hi = self.cost(budget).range()
        else:
            cost = self.cost(budget)
            alo, ahi = self._abits_bounds()
            lo, hi = feasible_range(cost, ctx.widths, ctx.pins, alo, ahi, ctx.n)
        if budget.value < lo - 1e-9:
            unit = _UNITS[budget.kind]
            why = (
                f" ({len(ctx.unreached)} layer(s) inside a branch no sample of the data runs are pinned at "
                f"{max(ctx.widths)} bits, e.g. '{ctx.unreached[0]}')"
                if ctx.unreached and budget.kind in TABLE_KINDS
                else ""
            )
            raise InputError(
                f"budget.{budget.kind}: {budget.value:g} is infeasible; with widths {ctx.widths} and the pins "
                f"the feasible range is {lo:.3f}..{hi:.3f} {unit}{why}",
                field=f"budget.{budget.kind}",
            )
        return lo, hi

    # ---- what a budget costs --------------------------------------------------------------------------
    def cost(self, budget: Budget):
        """The budget's cost function of a genome's (wbits, abits[, fmts])."""
        if budget.kind not in TABLE_KINDS:
            return BudgetCost(budget.kind, self.ctx.info.layers, skip=self.unreached())
        key = budget.kind
        if key not in self._tables:
            self._tables[key] = self._size_cost() if key == "size" else self._latency_cost()
        return self._tables[key]

    def unreached(self) -> list[int]:
        """Indices of the layers no sample of the data runs (`SearchContext.unreached`): outside an
        average-bits or BitOPs budget, inside a size or latency one (their bytes and time are real)."""
        return [self.ctx.names.index(n) for n in self.ctx.unreached]

    def unreached_note(self, budget: Budget, policy) -> str:
        """What an average-bits budget measured when some layers were left out of it ("" otherwise)."""
        from mqtool.policy import average_weight_bits

        skip = self.unreached()
        if not skip or budget.kind in TABLE_KINDS:
            return ""
        searched = [layer for i, layer in enumerate(self.ctx.info.layers) if i not in skip]
        avg = average_weight_bits(policy, searched)
        return f"avg {avg:.3f} bits over the {len(searched)} layers the data runs"

    def format_options(self, kind: str | None = None) -> list[list[tuple[int, int]]]:
        """Per layer, the (format code, activation bits) the GA may choose under a size or latency budget
        (`kind`): `int8` (integer kernels, input quantized) first, then the weight-only formats (`packed`,
        `nbits`: input float) and `dynamic` (input float in the graph, quantized by the kernel), as
        `passes.qdq_plan.allowed_formats` allows them. `dynamic` is left out under a size budget: `packed`
        takes no more bytes and keeps the input float, so it only widened the GA's space (mnist_cnn's
        60% size pick fell from 0.973 to 0.968 with it)."""
        from passes.qdq_plan import allowed_formats

        ctx = self.ctx
        nodes = {n.name: n for n in ctx.model.graph.node}
        out = []
        for layer in ctx.info.layers:
            allowed = allowed_formats(layer, nodes.get(layer.name), ctx.model.graph)
            opts = []
            for f in (Format.INT8, Format.PACKED, Format.NBITS, Format.DYNAMIC):
                if f in allowed and not (f is Format.DYNAMIC and kind == "size"):
                    weight_only = f is not Format.INT8 or layer.op_type in WEIGHT_ONLY_OPS
                    opts.append((FORMAT_CODES[f], FLOAT if weight_only else self.ctx.cfg.space.act_bits))
            out.append(opts)
        return out

    def _layer_bits(self, i: int) -> list[int]:
        return [self.ctx.pins[i]] if i in self.ctx.pins else list(self.ctx.widths)

    def _size_cost(self) -> TableCost:
        """Bytes of the emitted file: each layer's weight in its format (`passes.qdq_plan.format_bytes`,
        plus an activation Q/DQ pair for an int8 layer's input), and everything else as in the float model."""
        from passes.qdq_plan import ACT_QDQ_BYTES, format_bytes

        ctx = self.ctx
        table = []
        float_total = 0
        for i, (layer, opts) in enumerate(zip(ctx.info.layers, self.format_options("size"))):
            float_total += format_bytes(layer, FLOAT, Format.FLOAT)
            row = {}
            for b in self._layer_bits(i):
                for code, act in opts:
                    fmt = FORMATS[code]
                    qdq = ACT_QDQ_BYTES if act != FLOAT and fmt is Format.INT8 else 0
                    row[(b, code)] = float(format_bytes(layer, b, fmt if b != FLOAT else Format.FLOAT) + qdq)
            table.append(row)
        return TableCost("size", table, float(ctx.model.ByteSize() - float_total))

    def _latency_cost(self) -> TableCost:
        """ONNX Runtime CPU milliseconds at the deployment batch: each layer's entry of the latency table
        (`mqtool.latency`, measured once per model and machine, cached in the work directory) for the
        (bits, format) chosen, plus the table's `rest_ms`."""
        from mqtool.latency import measure_latency_table

        ctx = self.ctx
        options = self.format_options("latency")
        choices = {
            layer.name: [
                (b, FORMATS[code]) for b in self._layer_bits(i) if b != FLOAT for code, _ in options[i]
            ]
            for i, layer in enumerate(ctx.info.layers)
        }
        dep = ctx.cfg.deploy
        self.latency_table = measure_latency_table(
            ctx.model,
            ctx.info,
            choices,
            batch=dep.latency_batch,
            threads=dep.threads,
            data={k: v[: max(dep.latency_batch, 8)] for k, v in ctx.train.inputs.items()},
            cache_dir=ctx.workdir,
            act_bits=ctx.cfg.space.act_bits,
        )
        table = []
        for i, layer in enumerate(ctx.info.layers):
            row = {}
            for b in self._layer_bits(i):
                for code, act in options[i]:
                    row[(b, code)] = float(self.latency_table.entry(layer.name, b, FORMATS[code], act))
            table.append(row)
        return TableCost("latency", table, float(self.latency_table.rest_ms))

    def predicted_latency(self, policy) -> float:
        """The latency table's prediction for `policy` (with the layout borders a per-layer sum misses)."""
        self.cost(Budget("latency", 1.0))
        return float(self.latency_table.predict(policy))

    def correct_latency(self, extra: float) -> None:
        """Add `extra` ms to the latency estimate of every policy."""
        self.cost(Budget("latency", 1.0)).rest += float(extra)

    def emitted_bytes(self, policy) -> int:
        """Bytes of the file `policy` emits (the finetuned weights change values, never sizes)."""
        return self._emitted(policy).ByteSize()

    def _emitted(self, policy):
        """`policy` emitted in memory with the calibrated activation ranges."""
        from mqtool.emit import quantize_model
        from passes.qparams import ActParams, QuantParams

        ctx = self.ctx
        acts = {t: ActParams(range=r) for t, r in ctx.act_ranges.items()}
        sample = {k: v[:32] for k, v in ctx.train.inputs.items()}
        return quantize_model(ctx.model, policy, qparams=QuantParams(activations=acts), data=sample)

    def measured_latency(self, policy) -> float:
        """Median ms of the model `policy` emits, timed on ONNX Runtime as the table was (its batch,
        threads and feed: the training data's first samples)."""
        from mqtool.latency import latency_feed, measure_models_latency

        ctx, dep = self.ctx, self.ctx.cfg.deploy
        data = {k: v[: max(dep.latency_batch, 8)] for k, v in ctx.train.inputs.items()}
        feed = latency_feed(ctx.model, data, dep.latency_batch)
        timed = measure_models_latency(
            {"q": self._emitted(policy)}, feed, dep.latency_batch, dep.threads, budget_s=3.0
        )
        return float(timed["q"][0])

    def estimate(self, budget: Budget, policy) -> float:
        """The budget's estimate of `policy`'s cost (its layers' (bits, format) through the cost table)."""
        from mqtool.search.ga import Genome

        ctx = self.ctx
        lb = [policy.get(n) for n in ctx.names]
        options = self.format_options(budget.kind)

        def code(i: int, b) -> int:  # a layer without a format: what storage auto gives it
            if b.format is not None:
                return FORMAT_CODES[b.format]
            want = FLOAT if b.act_bits == FLOAT else ctx.cfg.space.act_bits
            return next((c for c, a in options[i] if a == want), options[i][0][0])

        g = Genome(
            tuple(b.weight_bits for b in lb),
            tuple(b.act_bits for b in lb),
            tuple(code(i, b) for i, b in enumerate(lb)) if budget.kind in TABLE_KINDS else (),
        )
        cost = self.cost(budget)
        args = [np.array(g.wbits), np.array(g.abits)] + ([np.array(g.fmts)] if g.fmts else [])
        return float(cost(*args))

    def correct_size(self, extra: float) -> None:
        """Add `extra` bytes to the size estimate of every policy (what emission adds that the table misses)."""
        self.cost(Budget("size", 1.0)).rest += float(extra)


def price_metadata(engine, budget: Budget) -> None:
    """The policy record written into the file (`mqtool.policy` metadata: per-layer widths, the search's
    config and sensitivity) is part of what a size budget pays; on a 30 KB model it is a sixth of the file.
    Priced once, before the first GA, from the record of a policy of this run (its length barely depends on
    the widths chosen; `_META_SLACK` covers what finetuning adds), so the GA does not spend bytes that
    `fit_size` would then take back with a second, tighter search."""
    import json

    from mqtool.search.ga import Genome

    costs, ctx = engine.costs, engine.ctx
    if costs.metadata_priced:
        return
    top = max(ctx.widths)
    options = costs.format_options("size")
    g = Genome(
        tuple(ctx.pins.get(i, top) for i in range(ctx.n)),
        tuple(o[0][1] for o in options),
        tuple(o[0][0] for o in options),
    )
    record = json.dumps(engine.policy(g, budget, 0.0, 0).to_json(), sort_keys=True, separators=(",", ":"))
    # + the other metadata entries and their keys, and what the record gains after the check
    costs.correct_size(len(record.encode()) + 64 + _META_SLACK)
    costs.metadata_priced = True


def fit_size(engine, budget: Budget, res):
    """A size budget is checked against the file the policy really emits: when the estimate was short (it
    counts activation Q/DQ pairs approximately), the estimate is raised by the shortfall and the search runs
    again, so the file meets the budget (`SearchEngine.search`)."""
    for attempt in range(1, 4):
        actual = engine.costs.emitted_bytes(res.policy) + _META_SLACK
        res.policy.meta["emitted_bytes"] = actual
        if actual <= budget.value:
            return res
        # the estimate was short for this kind of policy: raise the cost function's constant by the
        # shortfall and search again (a fresh GA: its cached costs were made with the old estimate)
        shortfall = actual - engine.costs.estimate(budget, res.policy)
        engine.costs.correct_size(max(shortfall, actual - budget.value) + 64)
        engine.progress("size_retry", {"budget": budget.label, "emitted": actual, "attempt": attempt})
        res = engine._search(budget, tag=f"r{attempt}")
    actual = engine.costs.emitted_bytes(res.policy) + _META_SLACK
    res.policy.meta["emitted_bytes"] = actual
    if actual > budget.value:
        raise InputError(
            f"budget.size: {budget.value:,.0f} bytes could not be met (the emitted file stays at "
            f"{actual:,} bytes); give a larger size",
            field="budget.size",
        )
    return res


# A latency budget's GA aims this far under the budget: the timed result varies by a few percent from one
# measurement to the next on a shared CPU (MiniLM: 8.36 / 8.67 ms for picks predicted at 7.98 / 8.21 ms
# under budgets of 8.11 / 8.26 ms), and a pick at the edge lands over it half the time.
_LATENCY_AIM = 0.05


def fit_latency(engine, budget: Budget, res=None):
    """The best policy under a latency budget. The GA aims `_LATENCY_AIM` under it (never below the
    feasible minimum); its pick is checked with the table's full prediction (layout borders between integer
    and float regions, which a per-layer sum misses), then on ONNX Runtime: emitted in memory and timed
    (`measured_latency`). When either is over the budget, the estimate is corrected by the difference (+1%
    of the budget, +3% after a timing) and the search runs again. The written file is timed again at the
    end of `convert`."""
    from dataclasses import replace

    costs = engine.costs
    aim = Budget("latency", max(budget.value * (1 - _LATENCY_AIM), costs.check(budget)[0]))
    res = engine._search(aim) if res is None else res
    for attempt in range(1, 4):
        predicted = costs.predicted_latency(res.policy)
        res.policy.meta["predicted_latency_ms"] = predicted
        worst, margin = predicted, 0.01
        if predicted <= budget.value:
            worst, margin = costs.measured_latency(res.policy), 0.03
            res.policy.meta["measured_latency_ms"] = worst
            if worst <= budget.value:
                break
        costs.correct_latency(worst - costs.estimate(budget, res.policy) + margin * budget.value)
        how = "timed" if margin > 0.01 else "predicted"
        engine.progress(
            "latency_retry", {"budget": budget.label, "ms": worst, "how": how, "attempt": attempt}
        )
        res = engine._search(aim, tag=f"r{attempt}")
    else:
        res.policy.meta["predicted_latency_ms"] = costs.predicted_latency(res.policy)
    res.policy.meta["budget"] = {"kind": budget.kind, "value": budget.value, "aimed": aim.value}
    return replace(res, budget=budget)
