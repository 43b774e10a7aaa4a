"""Benchmark: ONNX Runtime latency of our QDQ models vs fp32 and vs ORT `quantize_static` int8.

    python bench/bench_latency.py [--size 32] [--quick]

A ResNet-18-width network (torchvision's layout: 64-128-256-512 channels, 2 basic blocks per stage, 11.2M
parameters) with random weights (BatchNorm given random statistics) is built with torch and exported to
ONNX (opset 17) in the bench, at `--size` x `--size` input (default 32). Models: fp32; ours uniform w8a8 and a
mixed 4/8-bit policy, both with int8 storage (`quantize_model`, calibrated on 64 random images); ORT
`quantize_static` (QDQ, per-channel int8, uint8 activations); and, as a diagnostic, our w8a8 file with
full-range 8-bit INT8 weights (emission stores 8-bit integer-kernel weights at 7 bits, ORT's reduce range:
`qdq_plan.stored_weight_bits`): the same kernels, so it isolates the 7-bit choice.

Measures, each the median of interleaved runs at batch 1 and 32:
- wall: 2 intra-op threads, ORT's default session (the goal's definition);
- cpu: 2 threads with spinning off, CPU time of the process per run (work done, nearly independent of other
  processes competing for the cores, which inflate and scatter wall times on a shared machine);
- exactness: the fused (ORT_ENABLE_ALL) output of each quantized model against its unfused
  (ORT_DISABLE_ALL) graph, at batch 32; u8s8 kernels saturate int16 pair sums on x86 CPUs without VNNI.
--quick: 1 block per stage, 8x8 input, 16 calibration images, 3 runs. Writes bench/results/latency.json.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def resnet18(blocks: int = 2, classes: int = 10):
    import torch.nn as nn

    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.b2(self.c2(self.relu(self.b1(self.c1(x))))) + self.down(x))

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for i, c in enumerate((64, 128, 256, 512)):
        for j in range(blocks):
            layers.append(Basic(cin, c, 2 if (i > 0 and j == 0) else 1))
            cin = c
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


OURS, MIXED, ORT, OURS_S8 = (
    "ours-w8a8-int8",
    "ours-mixed48-int8",
    "ort-quantize_static-int8",
    "ours-w8a8-int8weights",
)


def cpu_session(path: str):
    """2 threads that sleep instead of spinning when idle: process CPU time then counts work only."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = common.THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def optimized_ops(path: str, tmp: str) -> str:
    """Compute ops of the graph ORT runs (ORT_ENABLE_ALL, `optimized_model_filepath`), most frequent first;
    layout and Q/DQ plumbing (Transpose, Reorder*, QuantizeLinear, DequantizeLinear, Flatten) left out."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    skip = {"Transpose", "ReorderInput", "ReorderOutput", "QuantizeLinear", "DequantizeLinear", "Flatten"}
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return ", ".join(f"{n} {op}" for op, n in ops.most_common() if op not in skip)


def fused_error(path: str, x: np.ndarray) -> float:
    """max |fused - unfused| / max |unfused| of the first output."""
    import onnxruntime as ort

    outs = []
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.log_severity_level = 3
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        outs.append(s.run(None, {"x": x})[0])
    return float(np.abs(outs[0] - outs[1]).max() / np.abs(outs[1]).max())


def cpu_isa() -> str:
    """The CPU's int8 dot-product support, from /proc/cpuinfo: what decides ORT's int8 speed and exactness."""
    try:
        flags = set(open("/proc/cpuinfo", encoding="utf-8").read().split())
    except OSError:
        return "unknown"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return "VNNI (" + ", ".join(sorted(flags & {"avx512_vnni", "avx_vnni"})) + ")"
    return "AVX2 without VNNI" if "avx2" in flags else "no AVX2"


def conclusion(ratios: dict, exact: dict) -> str:
    """What the ratios say about the two goals, in words (from this run's numbers)."""
    ceiling = max(ratios[f"{t}fp32_over_ort_int8_b{b}"] for t in ("", "cpu_") for b in (1, 32))
    gap = ratios["cpu_ours_int8_over_ort_int8_b32"]
    same = ratios["cpu_ours_int8weights_over_ort_int8_b32"]
    text = (
        f"CPU: {cpu_isa()}. ours / ORT at batch 32 is {gap} in CPU time, {same} with full-range 8-bit INT8 "
        "weights. Emission stores 8-bit integer-kernel weights at 7 bits in INT8 (u8s8 kernels, which on x86 "
        "without VNNI saturate int16 pair sums for full-range weights: fused vs unfused "
        f"{exact[OURS_S8]} for the full-range form vs {exact[OURS]} for ours here; docs/passes.md)."
    )
    if ceiling < 3:
        text += (
            f" fp32 / ORT's own int8 model is at most {ceiling} in this run: ORT's int8 kernels are barely "
            "faster than fp32 on this CPU, so fp32 / ours >= 3 cannot be reached here (the shared notes' 3.5x "
            "was measured on a VNNI CPU)."
        )
    return text


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--size", type=int, default=None, help="input height/width (default 32, --quick 8)")
    args = ap.parse_args()
    common.setup_torch()
    import onnx
    import torch

    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model, save_model_atomic
    from mqtool.policy import LayerBits, Policy

    size = args.size or (8 if args.quick else 32)
    torch.manual_seed(0)
    net = resnet18(1 if args.quick else 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16 if args.quick else 64, 3, size, size)).astype(np.float32)
    runs = 3 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        fp = os.path.join(tmp, "fp32.onnx")
        torch.onnx.export(
            net,
            (torch.from_numpy(x[:1]),),
            fp,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "N"}, "y": {0: "N"}},
            opset_version=17,
            dynamo=False,
        )
        model = onnx.load(fp)
        info = analyze(model)
        names = info.names
        paths = {"fp32": fp}
        mixed = Policy({n: LayerBits(4 if i % 2 else 8, 8) for i, n in enumerate(names)})
        for key, pol in ((OURS, Policy.uniform(names, 8)), (MIXED, mixed)):
            q = quantize_model(model, pol, data={"x": x}, storage="int8")
            paths[key] = os.path.join(tmp, key + ".onnx")
            save_model_atomic(q, paths[key])
        paths[ORT] = os.path.join(tmp, "ort.onnx")
        common.ort_peer(fp, x, paths[ORT], batch=64)
        paths[OURS_S8] = os.path.join(tmp, OURS_S8 + ".onnx")
        from unittest import mock

        with mock.patch("passes.qdq_plan.stored_weight_bits", lambda bits, container, act: bits):
            full = quantize_model(model, Policy.uniform(names, 8), data={"x": x}, storage="int8")
        save_model_atomic(full, paths[OURS_S8])
        lat: dict[str, dict[str, float]] = {k: {} for k in paths}
        cpu: dict[str, dict[str, float]] = {k: {} for k in paths}
        for measure, make, timer in (
            (lat, common.session, common.interleaved_ms),
            (cpu, cpu_session, lambda f, n: common.interleaved_ms(f, n, warmup=1, clock=time.process_time)),
        ):
            sessions = {k: make(p) for k, p in paths.items()}
            for b in (1, 32):
                feed = {"x": np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))}
                fns = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
                n = runs if b == 1 else max(3, runs // 4)
                for k, ms in timer(fns, n).items():
                    measure[k][f"batch{b}_ms"] = round(ms, 3)
                print("wall" if measure is lat else "cpu", b, {k: v for k, v in measure.items()}, flush=True)
            del sessions
        big = np.ascontiguousarray(np.resize(x, (32,) + x.shape[1:]))
        exact = {k: round(fused_error(p, big), 5) for k, p in paths.items() if k != "fp32"}
        print("fused vs unfused", exact, flush=True)
        ops = {k: optimized_ops(p, tmp) for k, p in paths.items()}
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    ratios = {}
    for b in (1, 32):
        k = f"batch{b}_ms"
        for tag, m in (("", lat), ("cpu_", cpu)):
            ratios[f"{tag}ours_int8_over_ort_int8_b{b}"] = round(m[OURS][k] / m[ORT][k], 3)
            ratios[f"{tag}ours_int8weights_over_ort_int8_b{b}"] = round(m[OURS_S8][k] / m[ORT][k], 3)
            ratios[f"{tag}fp32_over_ours_int8_b{b}"] = round(m["fp32"][k] / m[OURS][k], 3)
            ratios[f"{tag}fp32_over_ours_mixed_b{b}"] = round(m["fp32"][k] / m[MIXED][k], 3)
            ratios[f"{tag}fp32_over_ort_int8_b{b}"] = round(m["fp32"][k] / m[ORT][k], 3)
    params = info.totals.params
    result = {
        "cpu_isa": cpu_isa(),
        "input": size,
        "params": params,
        "latency_ms": lat,
        "cpu_ms": cpu,
        "fused_vs_unfused": exact,
        "ort_optimized_ops": ops,
        "bytes": sizes,
        "ratios": ratios,
    }

    def ratio_rows(tag: str) -> list[list]:
        rows = []
        for b in (1, 32):
            rows += [
                [f"ours int8 / ORT int8, batch {b}", ratios[f"{tag}ours_int8_over_ort_int8_b{b}"], "<= 1.05"],
                [
                    f"ours with INT8 8-bit weights / ORT int8, batch {b}",
                    ratios[f"{tag}ours_int8weights_over_ort_int8_b{b}"],
                    "(diagnostic)",
                ],
                [f"fp32 / ours w8a8, batch {b}", ratios[f"{tag}fp32_over_ours_int8_b{b}"], ">= 3"],
                [f"fp32 / ours mixed 4/8, batch {b}", ratios[f"{tag}fp32_over_ours_mixed_b{b}"], ">= 3"],
                [f"fp32 / ORT int8 (the ceiling), batch {b}", ratios[f"{tag}fp32_over_ort_int8_b{b}"], ""],
            ]
        return rows

    body = (
        f"## ORT latency: ResNet-18 width, {size}x{size} input, random weights ({params / 1e6:.1f}M "
        f"weight params)\n\n"
        + common.table(
            ["model", "wall ms b1", "wall ms b32", "CPU ms b1", "CPU ms b32", "fused vs unfused", "bytes"],
            [
                [
                    k,
                    lat[k]["batch1_ms"],
                    lat[k]["batch32_ms"],
                    cpu[k]["batch1_ms"],
                    cpu[k]["batch32_ms"],
                    exact.get(k, ""),
                    sizes[k],
                ]
                for k in paths
            ],
        )
        + "\n\nThe graphs ORT runs (ORT_ENABLE_ALL; layout and Q/DQ nodes not counted):\n\n"
        + common.table(["model", "compute ops"], [[k, v] for k, v in ops.items()])
        + "\n\nWall: 2 threads, ORT's default session. CPU: 2 threads without spinning, process CPU time per "
        "run (work done; on a shared machine wall times also measure the other processes). Fused vs unfused: "
        "max |ORT_ENABLE_ALL - ORT_DISABLE_ALL| / max |output| at batch 32: the integer kernels' "
        "requantization rounding, compounded over 20 layers, plus for u8s8 kernels on an x86 CPU without VNNI "
        "(this one) int16 saturation of pair sums. Mixed 4/8 = every other layer at 4 bits, stored in INT8 "
        f"tensors. `{OURS_S8}` is a diagnostic, not an emitter output: our w8a8 model with full-range "
        "8-bit INT8 weights instead of the 7 bits emission stores.\n\n"
        + common.table(["ratio (wall)", "value", "goal"], ratio_rows(""))
        + "\n\n"
        + common.table(["ratio (CPU time)", "value", "goal"], ratio_rows("cpu_"))
        + "\n\n"
        + conclusion(ratios, exact)
    )
    extra = "" if args.size is None else f" --size {args.size}"
    common.finish("latency", "bench_latency.py", args, result, body, extra)


if __name__ == "__main__":
    main()
