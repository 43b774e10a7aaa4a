"""Benchmark: forward+backward of the mnist_cnn example through `mqtool.backend.to_torch` vs by hand.

    python bench/bench_backend.py            # batch 256, 30 timed runs per variant
    python bench/bench_backend.py --quick    # smoke test (batch 8, 3 runs)

The hand-written network is examples/mnist_cnn/train.py's MobileNetMini with BatchNorm folded into the
convolutions (as in model.onnx), its weights copied from model.onnx; the script checks that it computes
the same logits as the converted graph before timing anything. Variants run interleaved in a rotating
order, so that load from other processes hits all alike; the median of the runs is reported. A third variant adds fake
quantization (4-bit weights, 8-bit layer inputs) to the converted graph. Writes bench/results/backend.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper

from mqtool.backend import ActFakeQuant, WeightFakeQuant, to_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "mnist_cnn")


def _train_module():
    """examples/mnist_cnn/train.py as a module (for its architecture constants only)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    spec = importlib.util.spec_from_file_location("mnist_cnn_train", os.path.join(EXAMPLE, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class HandCNN(nn.Module):
    """MobileNetMini of train.py, BatchNorm folded: conv(+bias) -> ReLU, depthwise-separable blocks."""

    def __init__(self, cfg: list[tuple[int, int]], stem: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, 1, 1)
        self.dw, self.pw, self.residual = nn.ModuleList(), nn.ModuleList(), []
        cin = stem
        for cout, stride in cfg:
            self.dw.append(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin))
            self.pw.append(nn.Conv2d(cin, cout, 1))
            self.residual.append(stride == 1 and cin == cout)
            cin = cout
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for dw, pw, residual in zip(self.dw, self.pw, self.residual):
            y = pw(F.relu(dw(x)))
            x = F.relu(x + y) if residual else F.relu(y)
        return self.fc(x.mean((2, 3)))

    def load_onnx(self, model: onnx.ModelProto) -> None:
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        (gemm,) = [n for n in model.graph.node if n.op_type == "Gemm"]
        mine = [self.stem] + [m for pair in zip(self.dw, self.pw) for m in pair]
        if len(convs) != len(mine):
            raise SystemExit(
                f"model.onnx has {len(convs)} convs, the hand-written net {len(mine)}: update HandCNN"
            )

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(np.array(inits[name]))

        with torch.no_grad():
            for node, conv in zip(convs, mine):
                conv.weight.copy_(tensor(node.input[1]))
                conv.bias.copy_(tensor(node.input[2]))
            self.fc.weight.copy_(tensor(gemm.input[1]))
            self.fc.bias.copy_(tensor(gemm.input[2]))


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (batch 8, 3 runs)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "backend.json"))
    args = ap.parse_args()
    batch, runs, warmup = (8, 3, 1) if args.quick else (args.batch, args.runs, 3)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = onnx.load(os.path.join(EXAMPLE, "model.onnx"))
    train = _train_module()
    hand = HandCNN(list(train.MobileNetMini.CFG))
    hand.load_onnx(model)
    converted = to_torch(model)
    quantized = to_torch(model)
    data = np.load(os.path.join(EXAMPLE, "test.npz"))
    x = torch.from_numpy(data["x"][np.arange(batch) % len(data["x"])])
    y = torch.from_numpy(data["y"][np.arange(batch) % len(data["y"])])

    with torch.no_grad():
        ref = converted(x)
        diff = float((hand(x) - ref).abs().max())
        if diff > 1e-4 * max(1.0, float(ref.abs().max())):
            raise SystemExit(
                f"the hand-written net differs from model.onnx (max diff {diff:.3g}): update HandCNN"
            )
        acts = quantized.run(
            {quantized.input_names[0]: x}, [la.info.input for la in quantized.layers.values()]
        )
    for layer in quantized.layers.values():
        layer.weight_quant = WeightFakeQuant.from_weight(layer.weight, 4, layer.channel_axis)
        a = acts[layer.info.input]
        quantized.set_act_quant(layer.info.input, ActFakeQuant.from_range(a.min().item(), a.max().item(), 8))

    variants = {"hand": hand, "converter": converted, "converter_fake_quant": quantized}
    for m in variants.values():
        m.train()
        for _ in range(warmup):
            _step(m, x, y)
    times: dict[str, list[float]] = {k: [] for k in variants}
    order = list(variants.items())
    for i in range(runs):
        # Rotate the order every run: no variant always runs right after another one.
        for name, m in order[i % len(order) :] + order[: i % len(order)]:
            times[name].append(_step(m, x, y))
    med = {k: 1000 * statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "mnist_cnn forward+backward (cross-entropy), PyTorch backend vs hand-written nn.Module",
        "quick": args.quick,
        "batch": batch,
        "runs": runs,
        "threads": args.threads,
        "hand_ms": round(med["hand"], 3),
        "converter_ms": round(med["converter"], 3),
        "converter_fake_quant_ms": round(med["converter_fake_quant"], 3),
        "ratio": round(med["converter"] / med["hand"], 3),
        "ratio_fake_quant": round(med["converter_fake_quant"] / med["hand"], 3),
        "max_logit_diff": diff,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(
        f"batch {batch}, {runs} runs, {args.threads} threads: hand {med['hand']:.2f} ms, "
        f"converter {med['converter']:.2f} ms (ratio {result['ratio']:.3f}), "
        f"converter + fake quant {med['converter_fake_quant']:.2f} ms (ratio {result['ratio_fake_quant']:.3f})"
    )
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
