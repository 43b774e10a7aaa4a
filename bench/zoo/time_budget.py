"""Benchmark: quality against the time budget on real zoo models (issue 15).

    python bench/zoo/time_budget.py --models ddddocr_ocr --budgets 5 45 [--merge]

Per model and budget: `mqtool convert --target-bits 4 --time-budget B` (everything else at defaults), the
run's wall time, its plan (what the planner cut to fit), its first ETAs and its score on the zoo's held-out
set (bench/zoo/score.py, the same task score as the zoo table). The 15-minute row is the zoo table's own
searched cell (bench/results/zoo.json), unless --budgets names 15. A budget at which the planner cuts
nothing is the untimed search: the plan line says "reduced to fit" only when it cut something.
Writes bench/results/time_budget.json (with --merge, rows of other budgets already there are kept) and
the `bench:time_budget` section of docs/benchmarks.md. Run alone on the machine: the plan is sized from
timings taken at the start of each run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common  # noqa: E402
import numpy as np  # noqa: E402

from zoo import build, models, score  # noqa: E402
from zoo.models import ZOO  # noqa: E402
from zoo.run import mqtool_convert  # noqa: E402

KEEP = (
    "wall_s",
    "plan",
    "stage_s",
    "eta_first",
    "eta_first_minute",
    "self_check",
    "avg_weight_bits",
    "error",
)


def run_model(name: str, budgets: list[float], timeout_over: float, tmp: str) -> dict:
    models.fetch([name], print)
    mpath = models.model_path(name)
    data_path, held_path = build.build(name, False, print)
    ref = score.reference(mpath, ZOO[name].task, dict(np.load(held_path)))
    main = score.MAIN_SCORE[ZOO[name].task]
    rows = {}
    for b in budgets:
        out = os.path.join(tmp, f"{name}-{b:g}.onnx")
        extra = ["--target-bits", "4", "--time-budget", f"{b:g}"]
        row = mqtool_convert(
            mpath, data_path, out, extra, int(b * 60 * timeout_over) + 120, f"{tmp}/wd-{b:g}"
        )
        if "error" not in row:
            row.update(score.score(out, ref))
        kept = {k: row[k] for k in (*KEEP, main, "cmd") if k in row}
        kept["commit"] = common.git_commit()
        rows[f"{b:g}"] = kept
        print(name, b, {k: kept.get(k) for k in ("wall_s", main, "self_check")}, flush=True)
    return {"main_score": main, "budgets": rows}


def doc_body(result: dict) -> str:
    zoo = json.load(open(os.path.join(common.ROOT, "bench", "results", "zoo.json"), encoding="utf-8"))
    out = [
        "## Quality against the time budget (issue 15)",
        "",
        "`mqtool convert --target-bits 4 --time-budget B` on zoo models, everything else at defaults; the "
        "score is the zoo's task score on its held-out set (bench/zoo/README.md). The 15-minute row is the "
        'zoo table\'s searched cell. "cut" is what the planner reduced to fit (none: the untimed search).',
        "",
        "| model | budget (min) | wall (s) | score | first ETA error | plan cut |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in result["models"].items():
        rows = dict(m["budgets"])
        cell = zoo["models"].get(name, {}).get("runs", {}).get("target4")
        if "15" not in rows and cell:
            rows["15"] = {**cell, "from_zoo": True}
        for b in sorted(rows, key=float):
            r = rows[b]
            sc = r.get(m["main_score"])
            eta = (r.get("eta_first") or {}).get("error")
            plan = r.get("plan", "")
            cut = (
                plan.split("reduced to fit: ")[1].rstrip(")").split(")")[0]
                if "reduced to fit" in plan
                else "none"
            )
            out.append(
                f"| {name} | {b}{' (zoo)' if r.get('from_zoo') else ''} | {r.get('wall_s', '—')} | "
                f"{'—' if sc is None else f'{sc:.3f}'} | {'—' if eta is None else f'{eta:+.0%}'} | {cut} |"
            )
    return "\n".join(out)


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["ddddocr_ocr"], choices=sorted(ZOO))
    ap.add_argument("--budgets", nargs="+", type=float, default=[5.0, 45.0])
    ap.add_argument("--merge", action="store_true", help="keep recorded rows of budgets not run")
    args = ap.parse_args()
    path = os.path.join(args.out_dir, "time_budget.json")
    previous = json.load(open(path, encoding="utf-8")) if args.merge and os.path.exists(path) else {}
    result = {"models": dict(previous.get("models", {}))}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            fresh = run_model(name, args.budgets, 1.2, tmp)
            old = result["models"].get(name, {}).get("budgets", {})
            result["models"][name] = {**fresh, "budgets": {**old, **fresh["budgets"]}}
    extra = f" --models {' '.join(args.models)} --budgets {' '.join(f'{b:g}' for b in args.budgets)}"
    common.finish(
        "time_budget",
        "zoo/time_budget.py",
        args,
        result,
        doc_body(result),
        extra + (" --merge" if args.merge else ""),
    )


if __name__ == "__main__":
    main()
