"""Benchmark: wall time of the emit pass pipeline (`quantize_model`) on real zoo topologies.

    python bench/bench_emit_speed.py [--runs 3] [--quick]

Models: the light zoo models the onnx package ships (`onnx/backend/test/data/light/`: SqueezeNet,
DenseNet-121 and ResNet-50 with 25M parameters; opset 9, every weight a ConstantOfShape of 0.02, which
`prepare` folds). Given a policy (random widths 2..8 per layer, seed 0, 8-bit activations) and the activation
ranges (`QuantParams.activations` with `ActParams(range=(-4, 4))`, so no calibration runs), times
`quantize_model` end to end (prepare, plan, per-channel MSE weight scales, Q/DQ insertion, packing, cleanup),
storage auto; median of --runs runs. Goal: ResNet-50 <= 10 s. The per-channel MSE weight-scale search
(`numerics.weight_scale`, which grows with the weight count) is also timed on its own, so the rest shows how
the graph passes grow with the node count. --quick: SqueezeNet only, 1 run. Writes
bench/results/emit_speed.json.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import numpy as np  # noqa: E402


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    import importlib

    import onnx

    from mqtool.analysis import analyze
    from mqtool.emit import quantize_model
    from mqtool.policy import LayerBits, Policy
    from passes.pipeline import prepare
    from passes.qdq_plan import plan_activations
    from passes.qparams import ActParams, QuantParams

    # The module, not the `passes.insert_qdq` attribute (the package exports the pass function by that name).
    insert_qdq_module = importlib.import_module("passes.insert_qdq")
    light = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "light")
    names = ["squeezenet"] if args.quick else ["squeezenet", "densenet121", "resnet50"]
    runs = 1 if args.quick else args.runs
    rows = {}
    for name in names:
        model = onnx.load(os.path.join(light, f"light_{name}.onnx"))
        t0 = time.perf_counter()
        prepared = prepare(model)
        t_prep = time.perf_counter() - t0
        info = analyze(prepared)
        rng = np.random.default_rng(0)
        policy = Policy({n: LayerBits(int(rng.choice([2, 3, 4, 5, 6, 8])), 8) for n in info.names})
        plan = plan_activations(prepared, info, policy)
        qp = QuantParams(activations={t: ActParams(range=(-4.0, 4.0)) for t in plan})
        times, scale_times = [], []
        for _ in range(runs):
            spent = [0.0]
            real = insert_qdq_module.weight_scale

            def timed(*a, real=real, spent=spent, **k):
                t = time.perf_counter()
                try:
                    return real(*a, **k)
                finally:
                    spent[0] += time.perf_counter() - t

            insert_qdq_module.weight_scale = timed
            try:
                t0 = time.perf_counter()
                q = quantize_model(model, policy, qparams=qp)
                times.append(time.perf_counter() - t0)
            finally:
                insert_qdq_module.weight_scale = real
            scale_times.append(spent[0])
        rows[name] = {
            "nodes_in": len(model.graph.node),
            "nodes_prepared": len(prepared.graph.node),
            "nodes_out": len(q.graph.node),
            "layers": len(info.layers),
            "params": info.totals.params,
            "prepare_s": round(t_prep, 3),
            "emit_s_median": round(statistics.median(times), 3),
            "emit_s_all": [round(t, 3) for t in times],
            "mse_scale_s_median": round(statistics.median(scale_times), 3),
            "rest_s_median": round(statistics.median([t - c for t, c in zip(times, scale_times)]), 3),
        }
        print(name, rows[name], flush=True)
    body = (
        "## Emit pipeline speed (given a policy and activation ranges, no calibration)\n\n"
        + common.table(
            [
                "model",
                "nodes in",
                "nodes out",
                "layers",
                "weight params",
                "prepare s",
                "quantize_model s (median)",
                "of which MSE scale search s",
                "rest s",
            ],
            [
                [
                    k,
                    v["nodes_in"],
                    v["nodes_out"],
                    v["layers"],
                    v["params"],
                    v["prepare_s"],
                    v["emit_s_median"],
                    v["mse_scale_s_median"],
                    v["rest_s_median"],
                ]
                for k, v in rows.items()
            ],
        )
        + f"\n\nMedian of {runs} run(s); goal: ResNet-50 <= 10 s. `quantize_model` includes `prepare` "
        "(the prepare column is prepare alone). The MSE scale search (41 candidate scales per output channel) "
        "grows with the weight count; the rest (graph passes, shape inference, opset conversion, packing) "
        "with the node count."
    )
    extra = "" if args.runs == 3 else f" --runs {args.runs}"
    common.finish("emit_speed", "bench_emit_speed.py", args, {"models": rows}, body, extra)


if __name__ == "__main__":
    main()
