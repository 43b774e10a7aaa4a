"""Shared helpers for the bundled MNIST examples (training loop, export, checks).

Only the example training scripts import this module; it is not part of mqtool.
"""

from __future__ import annotations

import os
import random
import time

import mnist_data
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OPSET = 17
THREADS = 2


def setup(seed: int) -> None:
    """Fix every seed and make CPU training reproducible."""
    torch.set_num_threads(THREADS)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(folder: str):
    mnist_data.ensure_data()
    xtr, ytr = mnist_data.load("train", folder)
    xte, yte = mnist_data.load("test", folder)
    return (torch.from_numpy(xtr), torch.from_numpy(ytr), torch.from_numpy(xte), torch.from_numpy(yte))


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image independently by up to +-max_shift pixels (zero fill)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # n,1,h,1
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # n,1,1,w
    bidx = torch.arange(n)[:, None, None, None]
    cidx = torch.arange(c)[None, :, None, None]
    return xp[bidx, cidx, rows, cols]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500):
    model.eval()
    logits = torch.cat([model(x[i : i + bs]) for i in range(0, len(x), bs)])
    return int((logits.argmax(1) == y).sum()) / len(y), logits


def train(
    model: nn.Module,
    xtr,
    ytr,
    xte,
    yte,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_shift: int,
    seed: int,
    label_smoothing: float = 0.0,
    warmup_epochs: int = 0,
    no_decay=lambda name, p: p.ndim <= 1,
) -> float:
    """AdamW + linear warmup + cosine decay; returns wall-clock seconds."""
    gen = torch.Generator().manual_seed(seed)
    decay, other = [], []
    for name, p in model.named_parameters():
        (other if no_decay(name, p) else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = (len(xtr) + batch_size - 1) // batch_size
    total = epochs * steps_per_epoch
    warm = warmup_epochs * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + np.cos(np.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xtr), generator=gen)
        tot_loss, n_ok = 0.0, 0
        for i in range(0, len(xtr), batch_size):
            idx = perm[i : i + batch_size]
            xb = random_shift(xtr[idx], max_shift, gen)
            yb = ytr[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot_loss += loss.item() * len(idx)
            n_ok += (out.argmax(1) == yb).sum().item()
        if ep % 5 == 4 or ep == epochs - 1:
            acc, _ = evaluate(model, xte, yte)
            print(
                f"epoch {ep + 1:3d}  loss {tot_loss / len(xtr):.4f}  "
                f"train acc {n_ok / len(xtr):.4f}  test acc {acc:.4f}  "
                f"({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    return time.perf_counter() - t0


def export_onnx(model: nn.Module, path: str, graph_name: str, doc: str = "") -> None:
    import onnx

    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
    tmp = path + ".tmp"
    torch.onnx.export(
        model,
        (dummy,),
        tmp,
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        do_constant_folding=True,
    )
    m = onnx.load(tmp)
    os.remove(tmp)
    rename_initializers(m)
    m.graph.name = graph_name
    m.doc_string = doc
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)  # single file, no external data


def rename_initializers(m) -> None:
    """Give exporter-generated initializers (``onnx::Conv_157``) readable names.

    An anonymous initializer consumed by a single node ``/blocks.0/dw/conv/Conv``
    becomes ``blocks.0.dw.conv.weight`` (or ``.bias``).  Names already set by
    the exporter (e.g. ``fc.weight``) are kept.
    """
    consumers: dict[str, list] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    taken = {i.name for i in m.graph.initializer}
    mapping = {}
    for init in m.graph.initializer:
        users = consumers.get(init.name, [])
        if not init.name.startswith("onnx::") or len(users) != 1:
            continue
        node = users[0]
        scope = node.name.rsplit("/", 1)[0].strip("/").replace("/", ".") or node.op_type
        pos = list(node.input).index(init.name)
        if node.op_type in ("Conv", "Gemm"):
            role = "weight" if pos == 1 else "bias"
        elif node.op_type == "MatMul":
            role = "weight"  # stored transposed: (in_features, out_features)
        elif node.op_type == "Add":
            role = "bias"
        else:
            role = f"{node.op_type}_{pos}"
        new = f"{scope}.{role}"
        if new in taken:
            continue
        taken.add(new)
        mapping[init.name] = new
        init.name = new
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            if i in mapping:
                n.input[k] = mapping[i]


def check_onnx(path: str, model: nn.Module, xte, yte) -> tuple[float, float]:
    """Checker + ORT accuracy (must equal torch's) + batch sizes 1 and 37."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    x = xte.numpy()
    ort_logits = np.concatenate(
        [sess.run(["logits"], {"input": x[i : i + 500]})[0] for i in range(0, len(x), 500)]
    )
    torch_acc, torch_logits = evaluate(model, xte, yte)
    ort_acc = int((ort_logits.argmax(1) == yte.numpy()).sum()) / len(yte)
    max_diff = float(np.abs(ort_logits - torch_logits.numpy()).max())
    print(
        f"fp32 test accuracy: torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}  "
        f"(max |logit diff| {max_diff:.2e})"
    )
    assert ort_acc == torch_acc, (ort_acc, torch_acc)
    assert (ort_logits.argmax(1) == torch_logits.numpy().argmax(1)).all()
    for bs in (1, 37):
        (out,) = sess.run(["logits"], {"input": x[:bs]})
        assert out.shape == (bs, 10), out.shape
        np.testing.assert_allclose(out, ort_logits[:bs], rtol=1e-4, atol=1e-4)
    print("onnxruntime batch sizes 1 and 37: OK")
    return torch_acc, ort_acc


def param_table(path: str) -> list[dict]:
    """Per quantizable node (Conv/Gemm/MatMul with an initializer weight) table."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    total = sum(int(a.size) for a in inits.values())
    rows = []
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = next((inits[i] for i in n.input[:2] if i in inits and inits[i].ndim >= 2), None)
        if w is None:
            continue
        b = inits[n.input[2]] if len(n.input) > 2 and n.input[2] in inits else None
        if n.op_type == "MatMul":  # Linear on 3-D input = MatMul + Add(bias)
            nxt = [c for c in m.graph.node if c.op_type == "Add" and n.output[0] in c.input]
            bias = [i for c in nxt for i in c.input if i in inits]
            b = inits[bias[0]] if len(nxt) == 1 and len(bias) == 1 else None
        rows.append(
            dict(
                name=n.name,
                op=n.op_type,
                shape=tuple(w.shape),
                weight=int(w.size),
                bias=0 if b is None else int(b.size),
            )
        )
    print(f"ONNX initializer parameters: {total}")
    print(f"{'node':32s} {'op':6s} {'weight shape':16s} {'weight':>7s} {'bias':>5s} {'share':>6s}")
    for r in rows:
        share = (r["weight"] + r["bias"]) / total
        r["share"] = share
        print(
            f"{r['name']:32s} {r['op']:6s} {str(list(r['shape'])):16s} "
            f"{r['weight']:7d} {r['bias']:5d} {100 * share:5.1f}%"
        )
    others = total - sum(r["weight"] + r["bias"] for r in rows)
    print(f"{'(other initializers)':32s} {'':6s} {'':16s} {others:7d} {'':5s} {100 * others / total:5.1f}%")
    return rows
