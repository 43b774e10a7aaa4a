"""Data for inputs that do not hold their samples on axis 0: a recurrent state `[2, N, H]` (samples on axis
1) and a shared scalar `sr` (given once as a 0-d array, fed unchanged with every batch), as silero-vad takes
them (`mqtool.runtime.sample_axis`). Files, folders and data functions are read along each input's sample
axis; calibration, validation, the self-check and the search's `Samples` all receive such data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from calibration.calibrate import CalibrationOptions, calibrate
from calibration.readers import iter_feeds
from mqtool.cli import cli
from mqtool.data import load_labelled, model_inputs, open_data
from mqtool.errors import InputError
from mqtool.runtime import ort_session
from mqtool.search.context import Samples
from mqtool.selfcheck import hold_out
from mqtool.validate import validate

R = np.random.default_rng(11)
N, H = 10, 3


def vad_like() -> onnx.ModelProto:
    """input [N, 4] @ W + state summed over its layer axis + sr / 16000, and the next state [2, N, H]."""
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["m"], name="fc"),
        helper.make_node("ReduceSum", ["state", "axes0"], ["s"], keepdims=0),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["srf", "inv"], ["k"]),
        helper.make_node("Add", ["m", "s"], ["a"]),
        helper.make_node("Add", ["a", "k"], ["output"]),
        helper.make_node("Unsqueeze", ["output", "axes0"], ["o1"]),
        helper.make_node("Concat", ["o1", "o1"], ["stateN"], axis=0),
    ]
    inits = [
        numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, H)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array(1 / 16000, np.float32), "inv"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", H]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", H]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "N", H]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def arrays(n: int = N) -> dict[str, np.ndarray]:
    return {
        "input": R.normal(size=(n, 4)).astype(np.float32),
        "state": R.normal(size=(2, n, H)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }


def reference(feed: dict[str, np.ndarray]) -> np.ndarray:
    return feed["input"] @ numpy_helper.to_array(vad_like().graph.initializer[0]) + feed["state"].sum(0) + 1.0


@pytest.fixture()
def files(tmp_path):
    a = arrays()
    np.savez(tmp_path / "d.npz", **a)
    (tmp_path / "dir").mkdir()
    for k, v in a.items():
        np.save(tmp_path / "dir" / f"{k}.npy", v)
    onnx.save(vad_like(), tmp_path / "m.onnx")
    return tmp_path, a


@pytest.mark.parametrize("where", ["d.npz", "dir"])
def test_files_are_read_on_each_inputs_sample_axis(files, where):
    d, a = files
    ds = open_data(d / where, vad_like())
    assert ds.num_samples == N
    batches = list(ds.batches(4))
    assert [b["state"].shape for b in batches] == [(2, 4, H), (2, 4, H), (2, 2, H)]
    for i, b in enumerate(batches):
        assert b["sr"].shape == () and b["sr"] == 16000
        np.testing.assert_array_equal(b["state"], a["state"][:, 4 * i : 4 * i + 4])
        np.testing.assert_array_equal(b["input"], a["input"][4 * i : 4 * i + 4])
        out = ort_session(vad_like()).run(["output"], b)[0]
        np.testing.assert_allclose(out, reference(b), rtol=1e-5, atol=1e-5)
    whole, labels = load_labelled(d / where, vad_like())
    assert labels is None and whole["sr"].shape == ()
    for k in a:
        np.testing.assert_array_equal(whole[k], a[k])


def test_counts_that_disagree_name_the_arrays_and_axes(tmp_path):
    a = arrays()
    np.savez(tmp_path / "bad.npz", **{**a, "state": a["state"][:, :7]})
    with pytest.raises(
        InputError,
        match=r"bad.npz: arrays have different numbers of samples \('input' 10, 'state' 7 \(axis 1\)\)",
    ):
        open_data(tmp_path / "bad.npz", vad_like())
    np.savez(tmp_path / "sr.npz", **{**a, "sr": np.full(N, 16000, np.int64)})
    with pytest.raises(
        InputError, match=r"sr.npz: array 'sr' has shape \[10\]; model input 'sr' is a scalar shared"
    ):
        open_data(tmp_path / "sr.npz", vad_like())
    np.savez(tmp_path / "st.npz", **{**a, "state": np.array(0.0, np.float32)})
    with pytest.raises(
        InputError, match=r"array 'state' is a scalar; model input 'state' takes samples on axis 1"
    ):
        open_data(tmp_path / "st.npz", vad_like())
    np.savez(tmp_path / "w.npz", **{**a, "state": a["state"][:, :, :2]})
    with pytest.raises(
        InputError, match=r"array 'state' has shape \[2, 10, 2\], model input 'state' wants \[2, 'N', 3\]"
    ):
        open_data(tmp_path / "w.npz", vad_like())


def test_function_items_one_sample_or_batches_with_a_shared_scalar(tmp_path):
    a = arrays()
    (tmp_path / "load.py").write_text(
        "import numpy as np\n"
        f"A = np.load({str(tmp_path / 'd.npz')!r})\n"
        "def one():\n"
        "    for i in range(len(A['input'])):\n"
        "        yield {'input': A['input'][i], 'state': A['state'][:, i], 'sr': 16000}\n"
        "def batched():\n"
        "    yield {'input': A['input'][:6], 'state': A['state'][:, :6], 'sr': A['sr']}\n"
        "    yield {'input': A['input'][6:], 'state': A['state'][:, 6:], 'sr': A['sr']}\n"
        "def mixed():\n"
        "    yield {'input': A['input'][:6], 'state': A['state'][:, :6], 'sr': 16000}\n"
        "    yield {'input': A['input'][6:], 'state': A['state'][:, 6:], 'sr': 8000}\n"
    )
    np.savez(tmp_path / "d.npz", **a)
    for fn in ("one", "batched"):
        whole, _ = load_labelled(f"{tmp_path / 'load.py'}:{fn}", vad_like())
        assert whole["sr"].shape == () and int(whole["sr"]) == 16000
        np.testing.assert_array_equal(whole["state"], a["state"])
        np.testing.assert_array_equal(whole["input"], a["input"])
    with pytest.raises(
        InputError, match=r"load.py:mixed: item 1: shared input 'sr' is 8000, earlier items gave 16000"
    ):
        open_data(f"{tmp_path / 'load.py'}:mixed", vad_like())


def test_calibration_from_arrays_and_files_matches_one_whole_run(files):
    d, a = files
    opts = CalibrationOptions(method="minmax", batch_size=3)
    whole = ort_session(vad_like(), outputs=["s", "a"]).run(["s", "a"], a)
    want = {t: (float(v.min()), float(v.max())) for t, v in zip(["s", "a"], whole)}
    for source in (a, d / "d.npz"):
        got = calibrate(vad_like(), ["s", "a"], source, opts)
        for t in want:
            np.testing.assert_allclose(got[t], want[t], rtol=1e-6, err_msg=t)
    feeds = list(iter_feeds(a, vad_like(), batch_size=4))
    assert [f["state"].shape[1] for f in feeds] == [4, 4, 2] and all(f["sr"].shape == () for f in feeds)


def test_validate_and_hold_out_take_samples_on_their_axes(files):
    d, a = files
    rep = validate(d / "m.onnx", d / "m.onnx", d / "d.npz", batch_size=4, per_layer=False, latency=False)
    assert rep.samples == N and all(o.sqnr_db is None or o.sqnr_db > 100 for o in rep.outputs)
    held = hold_out(d / "d.npz", vad_like(), fraction=0.3)
    assert held.samples == 3 and held.feed["sr"].shape == ()
    np.testing.assert_array_equal(held.feed["state"], a["state"][:, 7:])
    np.testing.assert_array_equal(held.feed["input"], a["input"][7:])


def test_search_samples_slice_each_input_on_its_axis():
    a = arrays()
    s = Samples(a, np.arange(N), {"input": 0, "state": 1, "sr": None})
    assert len(s) == N
    t = s.take(np.array([1, 4]))
    np.testing.assert_array_equal(t.inputs["state"], a["state"][:, [1, 4]])
    np.testing.assert_array_equal(t.inputs["input"], a["input"][[1, 4]])
    assert t.inputs["sr"] is a["sr"] and list(t.y) == [1, 4] and len(t) == 2


def test_convert_with_shared_and_axis_one_data_runs_its_self_check(files):
    d, _ = files
    r = CliRunner().invoke(
        cli,
        ["convert", str(d / "m.onnx"), "-o", str(d / "q.onnx"), "--bits", "8", "--data", str(d / "d.npz")],
    )
    assert r.exit_code == 0, r.stderr
    assert "1/1 layers quantized" in r.stdout and "self-check" in r.stderr
    q = onnx.load(d / "q.onnx")
    onnx.checker.check_model(q, full_check=True)
    assert any(n.op_type == "DequantizeLinear" for n in q.graph.node)
    got = ort_session(q).run(["output"], arrays(4))
    assert got[0].shape == (4, H)


def test_model_inputs_know_their_sample_axes():
    specs = {s.name: s for s in model_inputs(vad_like())}
    assert specs["state"].sample_axis == 1 and specs["sr"].sample_axis is None
    assert specs["state"].fixed_batch is None and specs["input"].fixed_batch is None


def test_search_forward_in_bounded_sub_batches_cuts_each_input_on_its_axis(tmp_path):
    """The search bounds memory by running no-grad forwards in sub-batches; a state on axis 1 and a shared
    scalar must be cut (and kept) like the data layer does (silero-vad's search failed there with a
    [256, 512] vs [84, 512] mismatch)."""
    import torch

    from mqtool.model import load_model
    from mqtool.search import SearchConfig
    from mqtool.search.context import SearchContext

    onnx.save(vad_like(), tmp_path / "m.onnx")
    a = arrays(40)
    ds = Samples(a, None, {"input": 0, "state": 1, "sr": None})
    ctx = SearchContext(load_model(str(tmp_path / "m.onnx")), ds, SearchConfig.flat(epochs=0), str(tmp_path))
    assert ctx.batched
    feeds = ctx.feeds(ds)
    with torch.no_grad():
        whole = ctx.forward_feeds(feeds)[0].numpy()
        ctx.max_batch = 7
        cut = ctx.forward_feeds(feeds)[0].numpy()
    np.testing.assert_allclose(whole, reference(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cut, whole, rtol=1e-6, atol=1e-6)
