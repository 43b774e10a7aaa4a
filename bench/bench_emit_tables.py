"""Benchmark: how ONNX Runtime runs quantized embedding tables and LSTM weights (why emission stores them
the way it does).

    python bench/bench_emit_tables.py [--quick]

Embedding: a [30000, 256] float table read by Gather with 64 indices, against the table stored as
DequantizeLinear (INT8 / INT4, one scale per row or per block of 32) + Gather, and as
com.microsoft.GatherBlockQuantized (INT4 / uint8, blocks of 32 along the row). LSTM: a bidirectional LSTM
(hidden 512, input 512, 40 steps, batch 1) with float W and R against W and R through DequantizeLinear (INT8 /
INT4 per row, and INT8 with a block covering the row), and as com.microsoft.DynamicQuantizeLSTM (int8 W
and R, input and state quantized at run time). Median CPU ms of the process per run (interleaved runs, 2
threads that do not spin: robust to the load of a shared machine), the file bytes, and the max |error|
against the float model. --quick: a [3000, 256] table, 10 steps, fewer runs.
Writes bench/results/emit_tables.json and its section of docs/benchmarks.md.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402


def _model(nodes, inits, inputs, opsets=(("", 21),)) -> bytes:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 10
    return m.SerializeToString()


def _q(arr: np.ndarray, bits: int, axis: int, block: int = 0):
    """Symmetric max-abs quantization: per row along `axis`, or per block of `block` along it."""
    qmax = 2 ** (bits - 1) - 1
    if block:
        shape = arr.shape[:axis] + (arr.shape[axis] // block, block) + arr.shape[axis + 1 :]
        s = np.abs(arr.reshape(shape)).max(axis=axis + 1) / qmax
        full = np.repeat(s, block, axis=axis)
    else:
        other = tuple(i for i in range(arr.ndim) if i != axis)
        s = np.abs(arr).max(axis=other) / qmax
        full = s.reshape([-1 if i == axis else 1 for i in range(arr.ndim)])
    q = np.clip(np.rint(arr / full), -qmax - 1, qmax).astype(np.int8)
    return q, s.astype(np.float32)


def embedding_models(v: int, d: int) -> tuple[dict[str, bytes], dict]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    table = (rng.normal(size=(v, d)) * 0.1).astype(np.float32)
    ids = [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 64])]
    out = {
        "float": _model(
            [helper.make_node("Gather", ["E", "ids"], ["y"])], [numpy_helper.from_array(table, "E")], ids
        )
    }
    for bits, block in ((8, 0), (4, 0), (8, 32), (4, 32)):
        q, s = _q(table, bits, 1 if block else 0, block)
        dt = ml_dtypes.int4 if bits == 4 else np.int8
        inits = [numpy_helper.from_array(q.astype(dt), "Eq"), numpy_helper.from_array(s, "Es")]
        attrs = {"axis": 1, "block_size": block} if block else {"axis": 0}
        nodes = [
            helper.make_node("DequantizeLinear", ["Eq", "Es"], ["Ed"], **attrs),
            helper.make_node("Gather", ["Ed", "ids"], ["y"]),
        ]
        out[f"DQ INT{bits} {'block 32' if block else 'per row'} + Gather"] = _model(nodes, inits, ids)
    for bits in (4, 8):
        q, s = _q(table, bits, 1, 32)
        if bits == 4:
            inits = [
                numpy_helper.from_array(q.astype(ml_dtypes.int4), "Eq"),
                numpy_helper.from_array(s, "Es"),
            ]
            ins = ["Eq", "ids", "Es"]
        else:
            inits = [numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), "Eq"), numpy_helper.from_array(s, "Es"),
                     numpy_helper.from_array(np.full(s.shape, 128, np.uint8), "Ez")]  # fmt: skip
            ins = ["Eq", "ids", "Es", "Ez"]
        node = helper.make_node(
            "GatherBlockQuantized",
            ins,
            ["y"],
            domain="com.microsoft",
            gather_axis=0,
            quantize_axis=1,
            block_size=32,
            bits=bits,
        )
        out[f"GatherBlockQuantized {'INT4' if bits == 4 else 'uint8'} block 32"] = _model(
            [node], inits, ids, (("", 21), ("com.microsoft", 1))
        )
    return out, {"ids": rng.integers(0, v, size=(1, 64)).astype(np.int64)}


def lstm_models(steps: int, hidden: int = 512, inp: int = 512) -> tuple[dict[str, bytes], dict]:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(2, 4 * hidden, inp)) * 0.05).astype(np.float32)
    r = (rng.normal(size=(2, 4 * hidden, hidden)) * 0.05).astype(np.float32)
    x = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [steps, 1, inp])]
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=hidden, direction="bidirectional")
    out = {"float": _model([lstm], [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")], x)}
    for bits, block in ((8, False), (4, False), (8, True)):
        nodes, inits = [], []
        for name, arr in (("W", w), ("R", r)):
            if block:  # one block covering each row, per direction: a per-(direction, row) scale
                q, s = _q(arr, bits, 2, arr.shape[2])
                attrs = {"axis": 2, "block_size": arr.shape[2]}
            else:  # ONNX per-axis scales are 1-D: one per row, shared by the two directions
                q, s = _q(arr, bits, 1)
                attrs = {"axis": 1}
            dt = ml_dtypes.int4 if bits == 4 else np.int8
            inits += [
                numpy_helper.from_array(q.astype(dt), name + "q"),
                numpy_helper.from_array(s, name + "s"),
            ]
            nodes.append(
                helper.make_node("DequantizeLinear", [name + "q", name + "s"], [name + "d"], **attrs)
            )
        nodes.append(
            helper.make_node("LSTM", ["x", "Wd", "Rd"], ["y"], hidden_size=hidden, direction="bidirectional")
        )
        out[f"DQ INT{bits} {'row block' if block else 'per row'} + LSTM"] = _model(nodes, inits, x)
    # ORT's integer LSTM: int8 W^T, R^T [D, K, 4H], a scale per (direction, gate row); X and H quantized
    # to uint8 at run time (what emission writes for an LSTM in format int8).
    inits, names = [], []
    for name, arr in (("W", w), ("R", r)):
        q, s = _q(arr, 8, 1)
        inits += [
            numpy_helper.from_array(np.ascontiguousarray(np.transpose(q, (0, 2, 1))), name + "q"),
            numpy_helper.from_array(np.tile(s[None, :], (2, 1)), name + "s"),
            numpy_helper.from_array(np.zeros((2, s.size), np.int8), name + "z"),
        ]
        names += [name + "q", name + "s", name + "z"]
    ins = ["x", names[0], names[3], "", "", "", "", "", names[1], names[2], names[4], names[5]]
    node = helper.make_node(
        "DynamicQuantizeLSTM",
        ins,
        ["y"],
        domain="com.microsoft",
        hidden_size=hidden,
        direction="bidirectional",
    )
    out["DynamicQuantizeLSTM (int8 W/R per row)"] = _model([node], inits, x, (("", 21), ("com.microsoft", 1)))
    return out, {"x": rng.normal(size=(steps, 1, inp)).astype(np.float32)}


def _session(model: bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = common.THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def measure(models: dict[str, bytes], feed: dict, runs: int) -> list[list]:
    import time

    sessions = {k: _session(v) for k, v in models.items()}
    ref = sessions["float"].run(None, feed)[0]
    fns = {k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}
    ms = common.interleaved_ms(fns, runs, clock=time.process_time)
    rows = []
    for k, s in sessions.items():
        err = float(np.abs(s.run(None, feed)[0] - ref).max())
        rows.append([k, round(ms[k], 3), len(models[k]), round(err, 4)])
    return rows


def main() -> None:
    args = common.arg_parser(__doc__).parse_args()
    runs = 5 if args.quick else 20
    emb, feed = embedding_models(3000 if args.quick else 30000, 256)
    emb_rows = measure(emb, feed, runs)
    lstm, feed = lstm_models(10 if args.quick else 40)
    lstm_rows = measure(lstm, feed, runs)
    result = {"embedding": emb_rows, "lstm": lstm_rows}
    head = ["form", "CPU ms", "bytes", "max abs error"]
    body = (
        "## Embedding tables and LSTM weights on ORT (how emission stores them)\n\n"
        f"Gather from a [{3000 if args.quick else 30000}, 256] table, 64 indices:\n\n"
        + common.table(head, emb_rows)
        + "\n\nBidirectional LSTM, hidden 512, input 512, batch 1:\n\n"
        + common.table(head, lstm_rows)
        + "\n\nORT does not fold a DequantizeLinear of a constant (it keeps QDQ for fusion): the whole table or "
        "W/R is dequantized every run, so DQ + Gather costs the table's size per lookup; "
        "GatherBlockQuantized reads only the gathered rows. Per-row INT8 is ORT's fastest DequantizeLinear; "
        "DynamicQuantizeLSTM runs the LSTM itself on integers."
    )
    common.finish("emit_tables", "bench_emit_tables.py", args, result, body)


if __name__ == "__main__":
    main()
