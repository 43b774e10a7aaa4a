"""The searched file against uniform PTQ at its budget (mqtool.fallback): a searched file that does worse
than uniform PTQ on the held-out samples is replaced by it, a good one stays, and only average-bits
budgets are compared."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

from mqtool import emit
from mqtool.analysis import analyze
from mqtool.fallback import against_uniform, headline, uniform_width
from mqtool.fidelity import ACCURACY, model_fidelity
from mqtool.outputs import OutputKind, OutputSpec
from mqtool.policy import Policy
from mqtool.selfcheck import check_conversion
from passes.pipeline import prepare

RNG = np.random.default_rng(3)
MLP = """g (float[N, 16] x) => (float[N, 6] z) {
  h = Gemm <transB = 1> (x, W1, b1)
  r = Relu (h)
  z = Gemm <transB = 1> (r, W2, b2)
}"""


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    d = tmp_path_factory.mktemp("fallback")
    m = parser.parse_model('<ir_version: 8, opset_import: ["" : 17]>\n' + MLP)
    weights = {"W1": RNG.normal(size=(32, 16)), "b1": RNG.normal(size=32) * 0.1,
               "W2": RNG.normal(size=(6, 32)) / 4, "b2": RNG.normal(size=6) * 0.1}  # fmt: skip
    m.graph.initializer.extend(numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    onnx.save(m, d / "m.onnx")
    x = RNG.normal(size=(200, 16)).astype(np.float32)
    np.savez(d / "data.npz", x=x)
    return d, x


def _written(model: str, out: str, policy: Policy, x) -> str:
    emit.convert(model, out, lambda m, info: (policy, None), data={"x": x[:100]})
    return out


def test_a_searched_file_worse_than_uniform_is_replaced_and_a_good_one_stays(mlp, tmp_path):
    d, x = mlp
    feeds = {"x": x[150:]}
    summary = {"check_feeds": feeds}
    names = analyze(prepare(onnx.load(d / "m.onnx"))).names
    # "searched" at 2 bits everywhere (what a bad search hands back) against uniform 4-bit: replaced
    bad = _written(str(d / "m.onnx"), str(tmp_path / "bad.onnx"), Policy.uniform(names, 2, 8), x)
    checked = check_conversion(str(d / "m.onnx"), bad, {"x": x[:100]}, summary=summary, bits=4.0)
    fb = against_uniform(str(d / "m.onnx"), bad, checked, 4, {"x": x[:100]}, summary=summary,
                         calibration="percentile", storage="auto")  # fmt: skip
    assert fb.replaced and fb.uniform > fb.searched + fb.stderr
    assert fb.measure == "model agreement" and fb.line().startswith("WARNING: against uniform 4-bit PTQ")
    written = onnx.load(bad)  # the file now holds the uniform policy
    meta = {p.key: p.value for p in written.metadata_props}
    assert '"weight_bits":4' in meta["mqtool.policy"] and fb.check.samples == 50
    onnx.checker.check_model(written, full_check=True)
    # a file as good as uniform 8-bit stays: uniform 4-bit does not beat it beyond noise
    good = _written(str(d / "m.onnx"), str(tmp_path / "good.onnx"), Policy.uniform(names, 8, 8), x)
    before = open(good, "rb").read()
    checked = check_conversion(str(d / "m.onnx"), good, {"x": x[:100]}, summary=summary, bits=4.0)
    fb = against_uniform(str(d / "m.onnx"), good, checked, 4, {"x": x[:100]}, summary=summary,
                         calibration="percentile", storage="auto")  # fmt: skip
    assert not fb.replaced and open(good, "rb").read() == before and fb.check is checked
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".mqtool-uniform-")]  # no leftovers


def test_only_average_bits_budgets_have_a_uniform_counterpart():
    widths = [2, 3, 4, 5, 6, 8]
    assert uniform_width({"kind": "bits", "value": 4.0}, widths) == 4
    assert uniform_width({"kind": "bits", "value": 4.7}, widths) == 4
    assert uniform_width({"kind": "bits", "value": 7.9}, widths) == 6
    assert uniform_width({"kind": "bits", "value": 1.5}, widths) is None
    assert uniform_width({"kind": "size", "value": 30000}, widths) is None
    assert uniform_width(None, widths) is None


def test_the_headline_is_the_task_measure():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 5))
    cand = ref + rng.normal(0, 0.5, ref.shape)
    y = ref.argmax(1)
    spec = OutputSpec("z", "z", OutputKind.LOGITS, "hand-made")
    measure, values = headline(model_fidelity([spec], {"z": ref}, {"z": cand}, y))
    assert measure == ACCURACY and values.shape == (40,)
    assert values.mean() == pytest.approx((cand.argmax(1) == y).mean())
    measure, _ = headline(model_fidelity([spec], {"z": ref}, {"z": cand}))
    assert measure == "model agreement"
