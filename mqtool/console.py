"""What a person sees on the terminal during a long run: one line per stage step with elapsed time and an
ETA, drawn as an updating bar when stderr is a terminal and as plain periodic lines otherwise (logs, CI),
and a closing summary table. Only the CLI uses this module; the library reports progress as events
(`(event, dict)` callbacks) and never writes to the terminal itself.

The ETA comes from the run's time plan (`mqtool.search.plan`): the predicted seconds of the stages not
started yet, plus what is left of the current stage, extrapolated from its own progress once it has run
longer than predicted.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable

import click

# Plan stage -> the stages of the progress display it covers.
_PLAN_KEYS = {"metaquantnet": "metaquantnet", "ga": "ga", "rerank": "rerank", "finetune": "finetune"}
_ORDER = ["setup", "metaquantnet", "ga", "rerank", "finetune", "emit and self-check"]


def clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    """Draws progress events on stderr. `quiet` silences everything (torchrun ranks other than 0,
    `--quiet`); `tty` defaults to whether stderr is a terminal."""

    def __init__(self, started: float, *, quiet: bool = False, tty: bool | None = None, budgets: int = 1):
        self.started = started
        self.quiet = quiet
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.budgets = max(1, budgets)
        self.plan: dict[str, float] | None = None
        self.stage: str | None = None
        self.stage_started = started
        self.times: dict[str, float] = {}  # stage -> seconds it took
        self._bar_open = False
        self._done: set[str] = set()
        self.notes: list[str] = []
        self.enter("setup")

    # ---- output ------------------------------------------------------------------------------------
    def line(self, msg: str) -> None:
        """A line that stays (closes an open bar first)."""
        if self.quiet:
            return
        if self._bar_open:
            click.echo("", err=True)
            self._bar_open = False
        click.echo(msg, err=True)

    def _bar(self, label: str, done: float, total: float, extra: str) -> None:
        if self.quiet:
            return
        frac = 0.0 if total <= 0 else min(1.0, done / total)
        now = time.monotonic()
        timing = f"elapsed {clock(now - self.started)}"
        eta = self.eta(frac)
        if eta is not None:
            timing += f"  ETA {clock(eta)}"
        if not self.tty:
            self.line(f"  {label} {_count(done)}/{_count(total)}  {extra}  {timing}".rstrip())
            return
        width = max(10, min(30, shutil.get_terminal_size((100, 20)).columns - 80))
        filled = int(round(frac * width))
        bar = "#" * filled + "-" * (width - filled)
        text = f"\r  {label} [{bar}] {_count(done)}/{_count(total)}  {extra}  {timing}"
        click.echo(text[: shutil.get_terminal_size((100, 20)).columns + 1].ljust(20), err=True, nl=False)
        self._bar_open = True
        if frac >= 1.0:
            click.echo("", err=True)
            self._bar_open = False

    # ---- stages and the ETA ------------------------------------------------------------------------
    def enter(self, stage: str) -> None:
        """Start `stage` (one of `_ORDER`; GA stages per budget count as "ga")."""
        now = time.monotonic()
        if self.stage is not None and self.stage != stage:
            self.times[self.stage] = self.times.get(self.stage, 0.0) + now - self.stage_started
            self._done.add(self.stage)
        if self.stage != stage:
            self.stage, self.stage_started = stage, now
        if self.stage == "setup":
            return

    def finish(self) -> None:
        if self.stage is not None:
            self.enter("__end__")
            self.stage = None

    def eta(self, frac: float) -> float | None:
        """Seconds to the end of the run (None without a plan)."""
        if self.plan is None or self.stage is None:
            return None
        stage = self.stage
        predicted = self.plan.get(stage, 0.0) / (self.budgets if stage == "ga" else 1)
        spent = time.monotonic() - self.stage_started
        if frac > 0.05 and spent > predicted:
            left_here = spent / frac * (1 - frac)
        else:
            left_here = max(predicted - spent, predicted * (1 - frac))
        later = 0.0
        idx = _ORDER.index(stage) if stage in _ORDER else len(_ORDER)
        for s in _ORDER[idx + 1 :]:
            if s not in self._done:
                later += self.plan.get(s, 0.0)
        return left_here + later * self._pace(predicted, spent, frac)

    def _pace(self, predicted_here: float, spent_here: float, frac: float) -> float:
        """How much slower (> 1) or faster than planned the run has gone so far, from the finished stages
        after setup and the current one's progress: later stages are predicted at the same pace."""
        actual = spent_here
        planned = predicted_here * frac
        for s, t in self.times.items():
            if s != "setup" and s in self.plan:
                actual += t
                planned += self.plan[s]
        if planned < 5.0:  # too little run to judge
            return 1.0
        return min(3.0, max(0.3, actual / planned))

    # ---- events from the library --------------------------------------------------------------------
    def __call__(self, event: str, d: dict) -> None:
        handler: Callable[[dict], None] | None = getattr(self, f"_on_{event}", None)
        if handler is not None:
            handler(d)

    def _on_stage(self, d: dict) -> None:
        self.enter(d["name"])

    def _on_objective(self, d: dict) -> None:
        sp = d["split"]
        labels = " (+ cross-entropy on labels)" if d["labels"] else ""
        self.line(
            f"objective: {d['metric']}{labels}; data: {sp['train']} train, {sp['search']} search, {sp['check']} "
            f"check (held out); samples run {'batched' if d['batched'] else 'one at a time'}"
        )
        for text in d["outputs"]:
            self.line(f"  output {text}")
        if d.get("unreached"):
            names = d["unreached"]
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            self.line(
                f"  {len(names)} layers inside control flow run on no training sample (a branch the data never "
                f"takes): kept at {d['unreached_bits']} bits, outside an average-bits budget ({', '.join(names[:3])}{more})"
            )

    def _on_ceiling(self, d: dict) -> None:
        left = self.started + d["budget_s"] - time.monotonic()
        self.line(
            f"time budget {d['budget_s'] / 60:g} min: ETA {clock(left)} at most (every stage is sized to fit; "
            "the plan and its own ETA follow the setup)"
        )

    def _on_plan(self, d: dict) -> None:
        self.plan = dict(d["stages"])
        end = self.started + sum(self.plan.values())
        self.line(d["text"] + f"; ETA {clock(end - time.monotonic())}")

    def _on_anchors(self, d: dict) -> None:
        if d["informative"]:
            self.line(
                f"fitness scale ({d['budget']}): 0 = uniform 8-bit PTQ ({d['ptq8']:.4g}), 1 = uniform "
                f"{d['low_bits']}-bit PTQ ({d['ptq_low']:.4g}); lower is better"
            )
        else:
            self.line(
                f"WARNING: the objective scores uniform 8-bit PTQ ({d['ptq8']:.4g}) and uniform "
                f"{d['low_bits']}-bit PTQ ({d['ptq_low']:.4g}) alike: it cannot rank policies (try --metric)"
            )

    def _on_mqn_start(self, d: dict) -> None:
        self.enter("metaquantnet")
        ratio = d["params"] / max(1, d["model_params"])
        self.line(
            f"MetaQuantNet: {d['params']:,} parameters ({ratio:.1%} of the model), {d['epochs']} epoch(s)"
        )

    def _on_mqn_resume(self, d: dict) -> None:
        self.line(f"MetaQuantNet: resuming after epoch {d['epoch']}")

    def _on_mqn_epoch(self, d: dict) -> None:
        self.enter("metaquantnet")
        self._bar("MetaQuantNet epoch", d["epoch"], d["epochs"], f"loss {d['loss']:.4f}  {d['seconds']:.1f}s")

    def _on_ga_resume(self, d: dict) -> None:
        self.line(f"search {d['budget']}: resuming after generation {d['generation']}")

    def _on_ga_generation(self, d: dict) -> None:
        self.enter("ga")
        rel = d.get("best_relative")
        best = f"{rel:.3f}" if rel is not None and rel == rel else f"{d['best_fitness']:.4g} (raw)"
        self._bar(
            f"GA {d['budget']} generation",
            d["generation"],
            d["generations"],
            f"best {best}  cost {d['best_cost']:.3f}  scored {d['cached']}",
        )

    def _on_ga_rerank(self, d: dict) -> None:
        self.enter("rerank")
        how = " (GA screened with float activations)" if d.get("screened_float") else ""
        rel = d.get("relative")
        fit = f"{rel:.3f}" if rel is not None and rel == rel else f"{d['fitness']:.4g}"
        self.line(f"  re-ranked the best {d['finalists']} on {d['samples']} samples{how}: fitness {fit}")

    def _on_finetune_epoch(self, d: dict) -> None:
        self.enter("finetune")
        rel = d.get("relative")
        fit = f"  fitness {rel:.3f}" if rel is not None and rel == rel else ""
        self._bar("finetune epoch", d["epoch"], d["epochs"], f"loss {d['loss']:.4f}{fit}")

    def _on_finetune_done(self, d: dict) -> None:
        if d.get("start") == "ptq" and len(d.get("start_scores", ())) > 1:
            self.line(
                "  finetuning started from the pretrained weights (PTQ): they scored better than MetaQuantNet's"
            )
        if d["best_epoch"] < d["epochs"]:
            self.line(
                f"  finetuning kept epoch {d['best_epoch']} of {d['epochs']} (the best on the search split; later "
                "epochs were worse)"
                if d["best_epoch"]
                else "  finetuning did not improve the search-split fitness: the model before finetuning is kept"
            )

    def _on_size_retry(self, d: dict) -> None:
        self.line(
            f"  {d['budget']}: the emitted file would be {d['emitted']:,} bytes; the size estimate is corrected "
            f"and the search runs again (attempt {d['attempt']})"
        )

    def _on_latency_retry(self, d: dict) -> None:
        self.line(
            f"  {d['budget']}: the pick runs at {d['ms']:.3f} ms ({d['how']}); the latency estimate is corrected "
            f"and the search runs again (attempt {d['attempt']})"
        )

    def _on_max_drop_probe(self, d: dict) -> None:
        self.line(
            f"max-drop probe {d['budget']}: {d['bytes']:,} bytes, drop {d['drop']:.2f} points ({d['measure']}) "
            "on ONNX Runtime"
        )

    def _on_emit_start(self, d: dict) -> None:
        self.enter("emit and self-check")
        self.line("emitting the QDQ model, then checking it on ONNX Runtime")

    def _on_deadline(self, d: dict) -> None:
        self.line(f"  time budget: {d['stage']} stopped early (see --time-budget)")
        self.notes.append(f"{d['stage']} cut short by the time budget")


def _count(v: float) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def summary_table(rows: list[tuple[str, str]], times: dict[str, float]) -> str:
    """The closing summary: `rows` of (what, value), then the time each stage took."""
    from mqtool.tables import format_table

    body = [[k, v] for k, v in rows]
    body += [[f"time: {k}", clock(v)] for k, v in times.items()]
    body.append(["time: total", clock(sum(times.values()))])
    return format_table(["summary", ""], body)
