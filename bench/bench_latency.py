"""Benchmark: ONNX Runtime latency of our QDQ models vs fp32 and vs ORT `quantize_static` int8.

    python bench/bench_latency.py [--size 32] [--quick]

A ResNet-18-width network (torchvision's layout: 64-128-256-512 channels, 2 basic blocks per stage, 11.2M
parameters) with random weights (BatchNorm given random statistics) is built with torch and exported to
ONNX (opset 17) in the bench, at `--size` x `--size` input (default 32). Models: fp32; ours uniform w8a8 and a
mixed 4/8-bit policy, both with int8 storage (`quantize_model`, calibrated on 64 random images); ORT
`quantize_static` (QDQ, per-channel int8, uint8 activations). Latency = median of interleaved runs at batch 1
and 32 with 2 intra-op threads. --quick: 1 block per stage, fewer runs. Writes bench/results/latency.json.
"""

from __future__ import annotations

import os
import sys
import tempfile

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


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    common.setup_torch()
    import onnx
    import torch
    from bench_ptq import ort_quantize

    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model, save_model_atomic
    from mqtool.policy import LayerBits, Policy

    torch.manual_seed(0)
    net = resnet18(1 if args.quick else 2)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3, args.size, args.size)).astype(np.float32)
    runs = 5 if args.quick else 40
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
        for key, pol in (("ours-w8a8-int8", Policy.uniform(names, 8)), ("ours-mixed48-int8", mixed)):
            q = quantize_model(model, pol, data={"x": x}, storage="int8")
            paths[key] = os.path.join(tmp, key + ".onnx")
            save_model_atomic(q, paths[key])
        paths["ort-quantize_static-int8"] = os.path.join(tmp, "ort.onnx")
        ort_quantize(fp, x, paths["ort-quantize_static-int8"], 8)
        sessions = {k: common.session(p) for k, p in paths.items()}
        lat: dict[str, dict[str, float]] = {k: {} for k in paths}
        for b in (1, 32):
            feed = {"x": np.ascontiguousarray(np.resize(x, (b,) + x.shape[1:]))}
            fns = {k: (lambda s=s, feed=feed: s.run(None, feed)) for k, s in sessions.items()}
            for k, ms in common.interleaved_ms(fns, runs if b == 1 else max(5, runs // 2)).items():
                lat[k][f"batch{b}_ms"] = round(ms, 3)
            print(b, lat, flush=True)
        sizes = {k: os.path.getsize(p) for k, p in paths.items()}
    ratios = {}
    for b in (1, 32):
        k = f"batch{b}_ms"
        ratios[f"ours_int8_over_ort_int8_b{b}"] = round(
            lat["ours-w8a8-int8"][k] / lat["ort-quantize_static-int8"][k], 3
        )
        ratios[f"fp32_over_ours_int8_b{b}"] = round(lat["fp32"][k] / lat["ours-w8a8-int8"][k], 3)
        ratios[f"fp32_over_ours_mixed_b{b}"] = round(lat["fp32"][k] / lat["ours-mixed48-int8"][k], 3)
    params = info.totals.params
    result = {"input": args.size, "params": params, "latency_ms": lat, "bytes": sizes, "ratios": ratios}
    body = (
        f"## ORT latency: ResNet-18 width, {args.size}x{args.size} input, random weights ({params / 1e6:.1f}M "
        f"weight params)\n\n"
        + common.table(
            ["model", "ms batch 1", "ms batch 32", "bytes"],
            [[k, v["batch1_ms"], v["batch32_ms"], sizes[k]] for k, v in lat.items()],
        )
        + "\n\n"
        + common.table(
            ["ratio", "value", "goal"],
            [
                ["ours int8 / ORT int8, batch 1", ratios["ours_int8_over_ort_int8_b1"], "<= 1.05"],
                ["ours int8 / ORT int8, batch 32", ratios["ours_int8_over_ort_int8_b32"], "<= 1.05"],
                ["fp32 / ours w8a8, batch 1", ratios["fp32_over_ours_int8_b1"], ">= 3"],
                ["fp32 / ours w8a8, batch 32", ratios["fp32_over_ours_int8_b32"], ">= 3"],
                ["fp32 / ours mixed 4/8, batch 1", ratios["fp32_over_ours_mixed_b1"], ">= 3"],
                ["fp32 / ours mixed 4/8, batch 32", ratios["fp32_over_ours_mixed_b32"], ">= 3"],
            ],
        )
        + "\n\nMixed 4/8 = every other layer at 4 bits, stored in INT8 tensors (runs at int8 speed)."
    )
    extra = "" if args.size == 32 else f" --size {args.size}"
    common.finish("latency", "bench_latency.py", args, result, body, extra)


if __name__ == "__main__":
    main()
