"""Per-layer sensitivity: how much the search's objective rises when one layer alone is quantized.

For every quantizable layer and candidate width b, the layer's weights are quantized to b bits the way
post-training quantization does it (per-channel MSE scales, `mqtool.numerics`; at 8 bits, stored at 7 where
the emitter does, as the search simulates it), every other layer keeps its float weights, and the search's fitness (`mqtool.search`: the same `SearchContext`, objective and search
split, so the same metric and output kinds) is measured; the row is that fitness minus the fitness of the
float weights. Activations are float by default, as the GA screens candidates; `activations="quantized"`
quantizes them as the emitter will (the search's activation width and calibrated ranges) for both numbers.

Next to it, MetaQuantNet's own view when a trained one is given (or found in a search's work directory):
the same increase with the weights MetaQuantNet generates for "this layer at b bits, the others float".
The two disagree where MetaQuantNet has learnt to compensate a layer (or failed to), which is what a person
debugging a bad quantization wants to see.

`context_sensitivity` works on a search's own context (what the search calls to record the sensitivity in
its policy: `SensitivityReport.to_meta()`, read back by `mqtool report`); `layer_sensitivity` builds that
context from a model and data (`mqtool sensitivity`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from mqtool import numerics
from mqtool.errors import InputError
from mqtool.fileio import atomic_path
from mqtool.policy import FLOAT
from mqtool.report import SENSITIVITY_VERSION
from mqtool.search import checkpoint
from mqtool.search.config import SearchConfig
from mqtool.search.context import Samples, SearchContext
from mqtool.search.metaquantnet import MetaQuantNet, stored_bits, weight_quant_ste
from mqtool.search.scoring import Scorer

log = logging.getLogger(__name__)

Progress = Callable[[str, dict], None]
ACTIVATIONS = ("float", "quantized")


@dataclass(frozen=True)
class LayerSensitivity:
    """One layer: width -> fitness increase with PTQ weights (`ptq`) and with MetaQuantNet's (`mqn`: None
    when MetaQuantNet's view is not available; a width MetaQuantNet was not trained for has no entry)."""

    name: str
    op_type: str
    params: int
    ptq: dict[int, float]
    mqn: dict[int, float] | None = None


@dataclass
class SensitivityReport:
    """The increases of every layer at every width, and what they were measured with."""

    metric: str
    activations: str
    samples: int
    baseline: float  # the fitness with every weight float (the activations as `activations` says)
    widths: list[int]
    layers: list[LayerSensitivity]
    mqn_note: str = ""  # where MetaQuantNet's view comes from, or why it is not available
    model: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def has_mqn(self) -> bool:
        return any(layer.mqn is not None for layer in self.layers)

    def ranked(self, width: int) -> list[LayerSensitivity]:
        """The layers, most sensitive at `width` first (PTQ increase)."""
        return sorted(self.layers, key=lambda s: -_sortable(s.ptq.get(width)))

    def kendall_tau(self, width: int) -> float | None:
        """Rank agreement between the PTQ and MetaQuantNet increases at `width` (None without both)."""
        pairs = [
            (s.ptq.get(width), s.mqn.get(width))
            for s in self.layers
            if s.mqn is not None and _finite(s.ptq.get(width)) and _finite(s.mqn.get(width))
        ]
        if len(pairs) < 2:
            return None
        a, b = np.array(pairs).T
        sa = np.sign(a[:, None] - a[None, :])
        sb = np.sign(b[:, None] - b[None, :])
        n = len(pairs)
        return float((sa * sb).sum() / (n * (n - 1)))

    def rows(self) -> list[dict]:
        """One row per layer per width: layer, width, ptq_increase, mqn_increase (None without it)."""
        return [
            {
                "layer": s.name,
                "width": b,
                "ptq_increase": _json_number(s.ptq.get(b)),
                "mqn_increase": None if s.mqn is None else _json_number(s.mqn.get(b)),
            }
            for s in self.layers
            for b in self.widths
        ]

    def to_json(self) -> dict:
        """The document `mqtool sensitivity --json` prints."""
        return {
            "model": self.model,
            "metric": self.metric,
            "activations": self.activations,
            "samples": self.samples,
            "baseline": _json_number(self.baseline),
            "widths": list(self.widths),
            "metaquantnet": {"available": self.has_mqn, "note": self.mqn_note},
            "kendall_tau": {str(b): self.kendall_tau(b) for b in self.widths} if self.has_mqn else {},
            "layers": [{"name": s.name, "op_type": s.op_type, "params": s.params} for s in self.layers],
            "rows": self.rows(),
        }

    def to_meta(self) -> dict:
        """What a policy records under `meta["sensitivity"]` (read back by `mqtool.report`): the PTQ
        increases per layer, keyed by width."""
        return {
            "version": SENSITIVITY_VERSION,
            "metric": self.metric,
            "activations": self.activations,
            "samples": self.samples,
            "baseline": _meta_number(self.baseline),
            "widths": list(self.widths),
            "layers": {s.name: {str(b): _meta_number(v) for b, v in s.ptq.items()} for s in self.layers},
        }

    def table(self) -> str:
        """The text `mqtool sensitivity` prints: a row per layer, a column per width, then what it means."""
        from mqtool.tables import format_table

        head = ["layer", "op", "params", *(f"{b} bits" for b in self.widths)]
        if self.has_mqn:
            head += [f"mqn {b}" for b in self.widths]
        rows = []
        for s in self.layers:
            row: list = [s.name, s.op_type, s.params, *(_cell(s.ptq.get(b)) for b in self.widths)]
            if self.has_mqn:
                row += [_cell(None if s.mqn is None else s.mqn.get(b)) for b in self.widths]
            rows.append(row)
        low = min(self.widths)
        top = [s for s in self.ranked(low)[:3] if _finite(s.ptq.get(low))]
        lines = [
            format_table(head, rows),
            "",
            f"increase of the search's fitness ({self.metric} on {self.samples} search-split samples, lower is "
            f"better; {self.baseline:.4g} with float weights) when one layer alone has its weights quantized "
            f"to that width (per-channel MSE scales), the others float; activations {self.activations}",
            f"most sensitive at {low} bits: " + ", ".join(f"{s.name} ({s.ptq[low]:+.4g})" for s in top),
        ]
        if self.has_mqn:
            taus = [(b, self.kendall_tau(b)) for b in self.widths]
            agree = ", ".join(f"{b} bits {t:.2f}" for b, t in taus if t is not None)
            lines.append(f"mqn columns: {self.mqn_note}; rank agreement with PTQ (Kendall tau): {agree}")
        else:
            lines.append(f"MetaQuantNet's view: not available ({self.mqn_note})")
        return "\n".join(lines)


def context_sensitivity(
    ctx: SearchContext,
    widths: Sequence[int] | None = None,
    *,
    mqn: MetaQuantNet | None = None,
    activations: str = "float",
    samples: int | None = None,
    progress: Progress | None = None,
) -> SensitivityReport:
    """The sensitivity of every layer of `ctx` (a search's context) at each of `widths` (default: the
    search's candidate widths), on the first `samples` of its search split (default: all of it). With
    `mqn`, MetaQuantNet's view too. Leaves the context's weights as they were."""
    if activations not in ACTIVATIONS:
        raise InputError(f"activations: expected one of {', '.join(ACTIVATIONS)}, got {activations!r}")
    widths = list(ctx.widths if widths is None else widths)
    bad = [b for b in widths if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 8]
    if not widths or bad:
        raise InputError(
            f"widths: candidate widths must be integers in 2..8, got {list(widths)}", field="widths"
        )
    widths = sorted(set(widths))
    if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
        raise InputError(f"samples: expected a positive integer, got {samples!r}", field="samples")
    progress = progress or _noop
    scorer = Scorer(ctx, _noop)
    n = len(ctx.search_set) if samples is None else min(samples, len(ctx.search_set))
    scorer.set_samples(n)
    chunks = scorer.plans[False]

    def fitness() -> float:
        total = sum(float(scorer.terms_of(ctx.forward_feeds(scorer.feeds(r)), r).sum()) for r in chunks)
        return scorer.aggregate(total, n)

    ctx.set_activation_quant(None if activations == "float" else tuple([ctx.cfg.space.act_bits] * ctx.n))
    # b bits as emission stores them (an 8-bit layer on integer kernels: 7-bit integers, as the search
    # simulates it whatever `activations` says: its policies quantize every layer's input)
    stored = {b: stored_bits([b] * ctx.n, None, ctx.reduce8) for b in widths}
    out = []
    with torch.no_grad():
        base = fitness()
        for i, layer in enumerate(ctx.info.layers):
            w = ctx.net.layers[layer.name].weight.detach()
            w_np = w.cpu().numpy()
            ptq = {}
            for b in widths:
                s = torch.from_numpy(numerics.weight_scale(w_np, b, layer.channel_axis, "mse")).to(w.device)
                q = weight_quant_ste(w, s, b, layer.channel_axis, stored[b][i])
                with ctx.net.override_weights({layer.name: q}):
                    ptq[b] = fitness() - base
            mq = None
            if mqn is not None:
                mq = {}
                for b in (b for b in widths if b in mqn.widths):
                    wbits = [FLOAT] * ctx.n
                    wbits[i] = b
                    with ctx.net.override_weights({layer.name: mqn.generate(wbits)[layer.name]}):
                        mq[b] = fitness() - base
            out.append(LayerSensitivity(layer.name, layer.op_type, layer.params, ptq, mq))
            progress("sensitivity_layer", {"layer": layer.name, "done": i + 1, "layers": ctx.n})
    return SensitivityReport(ctx.metric, activations, n, base, widths, out)


def layer_sensitivity(
    model: onnx.ModelProto,
    data: Samples,
    config: SearchConfig | None = None,
    *,
    widths: Sequence[int] | None = None,
    workdir: str | None = None,
    activations: str = "float",
    samples: int | None = None,
    progress: Progress | None = None,
) -> SensitivityReport:
    """The sensitivity of every quantizable layer of `model` (float ONNX, prepared here as the search
    prepares it) on the search split that `config` (default `SearchConfig()`) carves out of `data`.

    `workdir`: a search's work directory. MetaQuantNet's view is added when the MetaQuantNet trained there
    was trained on this model and data with the same options (`config`'s space, data, objective, training
    and seed, as its checkpoint records); otherwise `mqn_note` says why it is missing. Nothing is written
    to `workdir`: the context's own files go to a temporary folder."""
    config = config or SearchConfig()
    if workdir is not None and not os.path.isdir(workdir):
        raise InputError(f"workdir: {workdir} is not a folder", field="workdir")
    with tempfile.TemporaryDirectory(prefix="mqtool-sensitivity-") as scratch:
        ctx = SearchContext(model, data, config, scratch)
        mqn, note = _find_metaquantnet(ctx, workdir)
        rep = context_sensitivity(
            ctx, widths, mqn=mqn, activations=activations, samples=samples, progress=progress
        )
    rep.mqn_note = note
    return rep


def _find_metaquantnet(ctx: SearchContext, workdir: str | None) -> tuple[MetaQuantNet | None, str]:
    """The MetaQuantNet trained in `workdir` for this context, and a note saying what it is or why not."""
    from mqtool.search.train import build_metaquantnet

    if workdir is None:
        return None, "no work directory given"
    path = os.path.join(workdir, "metaquantnet.pt")
    if not os.path.exists(path):
        return None, f"no trained MetaQuantNet in {workdir}"
    try:
        state = checkpoint.load(path, ctx.fp)
    except InputError as e:
        return None, str(e)
    if state is None:
        return None, (
            f"the MetaQuantNet in {workdir} was trained on another model or data, or with other options "
            "(widths, seed, search split, metric, training)"
        )
    mqn = build_metaquantnet(ctx)
    mqn.load_state_dict(state["model"])
    mqn.to(ctx.device).eval()
    return (
        mqn,
        f"the MetaQuantNet of {workdir} ({_count(int(state['epoch']), 'epoch')}), its weights for the layer "
        "alone",
    )


def plot_sensitivity(rep: SensitivityReport, path: str) -> None:
    """The increases per layer, one line per width (PTQ solid, MetaQuantNet dashed), as a PNG at `path`."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise InputError("plot: drawing needs matplotlib (pip install matplotlib)", field="plot") from e
    names = [s.name for s in rep.layers]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(rep.widths)))
    for b, c in zip(rep.widths, colors):
        ax.plot(x, [_plot_value(s.ptq.get(b)) for s in rep.layers], "o-", color=c, ms=3, label=f"{b} bits")
        if rep.has_mqn:
            y = [_plot_value(None if s.mqn is None else s.mqn.get(b)) for s in rep.layers]
            ax.plot(x, y, "x--", color=c, ms=3, lw=0.8, label=f"{b} bits, MetaQuantNet")
    # increases span decades and can dip below 0 (noise): linear near 0, logarithmic beyond
    span = max([abs(v) for s in rep.layers for v in s.ptq.values() if _finite(v)] or [1.0])
    ax.set_yscale("symlog", linthresh=max(span * 1e-3, 1e-9))
    ax.set_ylabel(f"fitness increase ({rep.metric})")
    ax.set_xticks(x, names, rotation=90, fontsize=6)
    ax.set_title(f"one layer quantized, the others float (activations {rep.activations})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})
    plt.close(fig)


def _noop(event: str, info: dict) -> None:
    pass


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _finite(v: float | None) -> bool:
    return v is not None and math.isfinite(v)


def _sortable(v: float | None) -> float:
    if v is None or math.isnan(v):
        return -math.inf
    return v


def _json_number(v: float | None) -> float | None:
    """JSON has no NaN or infinity: a non-finite increase (the layer broke the model) reads null."""
    return float(v) if _finite(v) else None


def _meta_number(v: float | None) -> float | None:
    """Four significant digits: the record travels inside every searched model, where a size budget pays
    for it (a 16-layer model's record halves)."""
    return float(f"{float(v):.4g}") if _finite(v) else None


def _cell(v: float | None) -> float | str:
    return float(v) if _finite(v) else "-" if v is None else str(v)


def _plot_value(v: float | None) -> float:
    return float(v) if _finite(v) else float("nan")
