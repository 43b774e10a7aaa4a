"""`mqtool.sensitivity` and `mqtool sensitivity`: the fitness increase of one layer quantized alone, checked
against NumPy + onnx.reference; MetaQuantNet's view from a search's workdir; `report` showing why."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper, parser
from onnx.reference import ReferenceEvaluator

from mqtool.cli import cli
from mqtool.emit import quantize_model
from mqtool.numerics import dequantize, quantize_weight
from mqtool.policy import FLOAT, LayerBits, Policy
from mqtool.report import report
from mqtool.search import SearchConfig, checkpoint
from mqtool.search.context import Samples, SearchContext
from mqtool.search.train import build_metaquantnet
from mqtool.sensitivity import context_sensitivity, layer_sensitivity

from .conftest import example_path

RNG = np.random.default_rng(3)
WIDTHS = [2, 4, 8]


def three_heads() -> onnx.ModelProto:
    """Softmax(x Wa + x Wb + x Wc): Wa's weights are 40x the others', so its quantization error moves the
    logits 40x more; it is the sensitive layer at every width."""
    m = parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 10] p) {
          a = MatMul(x, Wa)
          b = MatMul(x, Wb)
          c = MatMul(x, Wc)
          ab = Add(a, b)
          s = Add(ab, c)
          p = Softmax <axis = -1> (s)
        }"""
    )
    for name, scale in (("Wa", 2.0), ("Wb", 0.05), ("Wc", 0.05)):
        w = (RNG.normal(size=(16, 10)) * scale).astype(np.float32)
        m.graph.initializer.append(numpy_helper.from_array(w, name))
    onnx.checker.check_model(m, full_check=True)
    return m


MODEL = three_heads()
DATA = RNG.normal(size=(300, 16)).astype(np.float32)


def samples() -> Samples:
    return Samples({"x": DATA})


def layer_of(ctx: SearchContext, weight: str) -> str:
    return next(layer.name for layer in ctx.info.layers if layer.weight == weight)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    return SearchContext(MODEL, samples(), SearchConfig(), str(tmp_path_factory.mktemp("wd")))


def test_sensitive_layer_ranks_first_and_increase_matches_numpy(ctx):
    rep = context_sensitivity(ctx, WIDTHS)
    big = layer_of(ctx, "Wa")
    assert rep.metric == "kl" and rep.samples == len(ctx.search_set) and rep.widths == WIDTHS
    for b in WIDTHS:
        ranked = rep.ranked(b)
        assert ranked[0].name == big
        assert ranked[0].ptq[b] > 20 * max(s.ptq[b] for s in ranked[1:]), b
    # fewer bits, more damage
    assert rep.layers[0].ptq[2] > rep.layers[0].ptq[4] > rep.layers[0].ptq[8] > 0

    # The same number from NumPy: Wa quantized to 2 bits (per-channel MSE scales), run with onnx.reference,
    # KL(fp32 || quantized) of the probabilities, averaged over the search split (the float weights' own
    # fitness is ~0: the teacher is the model itself).
    layer = next(x for x in ctx.info.layers if x.name == big)
    x = ctx.search_set.inputs["x"]
    inits = {i.name: numpy_helper.to_array(i) for i in ctx.model.graph.initializer}
    q, s = quantize_weight(inits["Wa"], 2, layer.channel_axis)
    p_fp = ReferenceEvaluator(ctx.model).run(None, {"x": x})[0].astype(np.float64)
    p_q = ReferenceEvaluator(ctx.model).run(None, {"x": x, "Wa": dequantize(q, s, 0, layer.channel_axis)})[0]
    kl = (p_fp * (np.log(p_fp) - np.log(np.maximum(p_q.astype(np.float64), 1e-12)))).sum(1).mean()
    assert abs(rep.baseline) < 1e-6
    assert rep.layers[0].ptq[2] == pytest.approx(kl, rel=2e-3)


def test_samples_and_activations_options(ctx):
    few = context_sensitivity(ctx, [2], samples=16)
    assert few.samples == 16
    quantized = context_sensitivity(ctx, [2], activations="quantized")
    assert quantized.activations == "quantized"
    # 8-bit activations cost something even with float weights
    assert quantized.baseline > context_sensitivity(ctx, [2]).baseline
    with pytest.raises(Exception, match="activations"):
        context_sensitivity(ctx, [2], activations="int")
    with pytest.raises(Exception, match="widths: candidate widths must be integers in 2..8"):
        context_sensitivity(ctx, [1, 4])


def test_json_rows_and_meta(ctx):
    rep = context_sensitivity(ctx, WIDTHS)
    doc = json.loads(json.dumps(rep.to_json()))
    rows = doc["rows"]
    assert len(rows) == len(ctx.info.layers) * len(WIDTHS)
    assert {(r["layer"], r["width"]) for r in rows} == {(n, b) for n in ctx.names for b in WIDTHS}
    assert all(set(r) == {"layer", "width", "ptq_increase", "mqn_increase"} for r in rows)
    assert all(r["mqn_increase"] is None for r in rows) and not doc["metaquantnet"]["available"]
    by = {(r["layer"], r["width"]): r["ptq_increase"] for r in rows}
    assert by[(rep.layers[0].name, 2)] == rep.layers[0].ptq[2]
    meta = rep.to_meta()
    # the record a model carries keeps four significant digits (a size budget pays for it)
    recorded = meta["layers"][rep.layers[1].name]["4"]
    assert meta["widths"] == WIDTHS and recorded == pytest.approx(rep.layers[1].ptq[4], rel=5e-4)
    assert len(repr(recorded).lstrip("-").replace(".", "").split("e")[0].strip("0")) <= 4


def test_metaquantnet_view_from_workdir(tmp_path, ctx):
    """An untrained MetaQuantNet generates exactly the PTQ weights (its heads start at zero), so its view
    equals the PTQ one; a workdir of another seed, or without a MetaQuantNet, gives no view and says why."""
    wd = tmp_path / "wd"
    wd.mkdir()
    mqn = build_metaquantnet(ctx)
    checkpoint.save(
        str(wd / "metaquantnet.pt"), {"fingerprint": ctx.fp, "epoch": 0, "model": mqn.state_dict()}
    )
    rep = layer_sensitivity(MODEL, samples(), SearchConfig(), widths=WIDTHS, workdir=str(wd))
    assert rep.has_mqn and "0 epochs" in rep.mqn_note
    for s in rep.layers:
        for b in WIDTHS:
            assert s.mqn[b] == pytest.approx(s.ptq[b], rel=1e-4, abs=1e-9)
    assert rep.kendall_tau(2) == 1.0
    assert os.listdir(wd) == ["metaquantnet.pt"]  # nothing written there

    other = layer_sensitivity(MODEL, samples(), SearchConfig(seed=1), widths=[2], workdir=str(wd))
    assert not other.has_mqn and "another model or data" in other.mqn_note
    empty = layer_sensitivity(MODEL, samples(), SearchConfig(), widths=[2], workdir=str(tmp_path))
    assert not empty.has_mqn and "no trained MetaQuantNet" in empty.mqn_note
    assert "MetaQuantNet's view: not available (no trained MetaQuantNet" in empty.table()


def test_report_shows_the_recorded_sensitivity(ctx, caplog):
    rep = context_sensitivity(ctx, WIDTHS)
    a, b, c = (layer_of(ctx, w) for w in ("Wa", "Wb", "Wc"))
    bits = {a: 8, b: 2, c: FLOAT}
    policy = Policy(
        {n: LayerBits(k, FLOAT) for n, k in bits.items()}, meta={"sensitivity": rep.to_meta(), "seed": 0}
    )
    q = quantize_model(ctx.model, policy)
    got = {r.name: (r.sensitivity, r.sensitivity_lower) for r in report(q).layers}
    ptq = {s.name: {b: float(f"{v:.4g}") for b, v in s.ptq.items()} for s in rep.layers}  # as recorded
    assert got[a] == (ptq[a][8], ptq[a][4])  # at its width, and at the next lower candidate width
    assert got[b] == (ptq[b][2], None)  # already the lowest
    assert got[c] == (None, ptq[c][8])  # float: what the widest width would cost
    text = report(q).table()
    assert "sens@w" in text.splitlines()[0] and "how much the search's fitness (kl" in text
    assert report(q).to_json()["sensitivity"] == {"metric": "kl", "activations": "float", "widths": WIDTHS}

    plain = report(quantize_model(ctx.model, Policy(policy.layers)))
    assert plain.sensitivity is None and "sens@w" not in plain.table()
    assert all(r.sensitivity is None and r.sensitivity_lower is None for r in plain.layers)
    broken = Policy(policy.layers, meta={"sensitivity": {"version": 1, "layers": "?"}})
    with caplog.at_level(logging.WARNING, logger="mqtool.report"):
        assert report(quantize_model(ctx.model, broken)).sensitivity is None
    assert "sensitivity is unreadable" in caplog.text


def test_cli_table_json_and_plot(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(MODEL, str(model))
    np.savez(tmp_path / "d.npz", x=DATA)
    args = ["sensitivity", str(model), "--data", str(tmp_path / "d.npz"), "--widths", "2,8"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["layer", "op", "params", "2", "bits", "8", "bits"]
    assert "MetaQuantNet's view: not available (no work directory given)" in r.stdout
    r = CliRunner().invoke(cli, [*args, "--json", "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["rows"]) == 3 * 2 and doc["model"] == str(model)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("widths", ["1,9", "2,x"])
def test_bad_widths_exit_2_with_one_line(tmp_path, widths):
    model = tmp_path / "m.onnx"
    onnx.save(MODEL, str(model))
    np.savez(tmp_path / "d.npz", x=DATA)
    r = CliRunner().invoke(
        cli, ["sensitivity", str(model), "--data", str(tmp_path / "d.npz"), "--widths", widths]
    )
    assert r.exit_code == 2
    assert r.stderr.startswith("mqtool: error: --widths") and r.stderr.count("\n") == 1, r.stderr


def test_bundled_cnn_with_a_searched_workdir(tmp_path):
    """The command on mnist_cnn with tiny settings: a tiny search trains MetaQuantNet in a workdir; the
    sensitivity with the same data and options finds it and shows both views; other widths do not."""
    model, data = example_path("mnist_cnn"), example_path("mnist_cnn", "train.npz")
    wd = str(tmp_path / "wd")
    tiny = ["--max-samples", "200", "--workdir", wd]
    r = CliRunner().invoke(
        cli,
        ["search", model, "--data", data, *tiny, "--target-bits", "4", "-o", str(tmp_path / "p.json")]
        + ["--epochs", "1", "--population", "4", "--generations", "1", "--rerank", "0", "--time-budget", "0"],
    )
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["sensitivity", model, "--data", data, *tiny, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["metaquantnet"]["available"] and doc["metric"] == "ce" and len(doc["layers"]) == 16
    assert len(doc["rows"]) == 16 * 6 and all(row["mqn_increase"] is not None for row in doc["rows"])
    at2 = {row["layer"]: row["ptq_increase"] for row in doc["rows"] if row["width"] == 2}
    at8 = {row["layer"]: row["ptq_increase"] for row in doc["rows"] if row["width"] == 8}
    # 2 bits hurt every layer more than 8 bits, summed over the layers
    assert sum(at2.values()) > 10 * abs(sum(at8.values()))
    r = CliRunner().invoke(cli, ["sensitivity", model, "--data", data, *tiny, "--widths", "2,8"])
    assert r.exit_code == 0, r.output
    assert "MetaQuantNet's view: not available (the MetaQuantNet in" in r.stdout


@pytest.mark.parametrize("name", ["mnist_vit", "mnist_vit_compact"])
def test_bundled_vits_table_json_plot(tmp_path, name):
    """Both ViT examples with tiny settings; the compact one reads mnist_vit's data through its links."""
    model, data = example_path(name), example_path(name, "train.npz")
    assert os.path.samefile(data, example_path("mnist_vit", "train.npz"))
    tiny = ["--max-samples", "200", "--widths", "2,8", "--samples", "24"]
    args = ["sensitivity", model, "--data", data, *tiny]
    r = CliRunner().invoke(cli, [*args, "--json", "--plot", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["samples"] == 24 and len(doc["layers"]) == 26 and len(doc["rows"]) == 26 * 2
    assert doc["layers"][0]["name"] == "/patch_embed/Conv" and doc["metric"] == "ce"
    at = {w: sum(row["ptq_increase"] for row in doc["rows"] if row["width"] == w) for w in (2, 8)}
    assert at[2] > 10 * abs(at[8])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_workdir_exit_2(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(MODEL, str(model))
    np.savez(tmp_path / "d.npz", x=DATA)
    args = ["sensitivity", str(model), "--data", str(tmp_path / "d.npz"), "--workdir", str(tmp_path / "no")]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and r.stderr == f"mqtool: error: --workdir: {tmp_path / 'no'} is not a folder\n"
