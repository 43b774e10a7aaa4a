"""Models that do not take a free batch on axis 0, fed by calibration and validation: a fixed batch (the
`[1, 3, H, W]` exports of the zoo detectors) runs in slices of its size with the same results as one batched
run of the free-batch twin; a scalar input is shared by every run; a recurrent state `[2, N, 128]` carries
its samples on axis 1 (`mqtool.runtime`)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.calibrate import CalibrationOptions, calibrate
from mqtool.analysis import analyze
from mqtool.data import model_inputs
from mqtool.emit import quantize_model
from mqtool.errors import InputError
from mqtool.policy import Policy
from mqtool.runtime import fixed_batch, sample_axis, split_feed
from mqtool.validate import validate

R = np.random.default_rng(7)


def conv_net(batch: int | str) -> onnx.ModelProto:
    """x [batch, 3, 8, 8] -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm -> y [batch, 4]."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf"], ["y"], transB=1, name="fc"),
    ]
    rng = np.random.default_rng(0)
    inits = {
        "W": rng.normal(0, 0.3, (6, 3, 3, 3)),
        "B": rng.normal(0, 0.1, 6),
        "Wf": rng.normal(0, 0.3, (4, 6)),
    }
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_sample_axis_rule():
    assert sample_axis(None) == 0 and sample_axis([None, 3, 8, 8]) == 0
    assert sample_axis([1, 3, 416, 416]) == 0 and sample_axis([1, 1, 64, None]) == 0  # fixed batch of 1
    assert sample_axis([4, 3, 8, 8]) == 0  # every dim fixed: a fixed batch of 4
    assert sample_axis([2, None, 128]) == 1  # a recurrent state [layers, N, hidden]
    assert sample_axis([]) is None  # a scalar (sr): shared by every sample


@pytest.mark.parametrize("method", ["minmax", "percentile", "entropy"])
def test_calibration_of_a_fixed_batch_model_equals_the_batched_run(method):
    """Arrays of 6 samples (the search hands calibration its training arrays) used to reach ORT as one
    batch of 6 and fail on a [1, 3, 8, 8] input."""
    x = R.normal(size=(6, 3, 8, 8)).astype(np.float32)
    tensors = ["c", "r", "y"]
    opts = CalibrationOptions(method=method, batch_size=64)
    one = calibrate(conv_net(1), tensors, {"x": x}, opts)
    free = calibrate(conv_net("N"), tensors, {"x": x}, opts)
    for t in tensors:
        np.testing.assert_allclose(one[t], free[t], rtol=1e-5, atol=1e-6, err_msg=t)


def test_fixed_batch_of_two_drops_a_partial_last_run_and_refuses_too_few():
    specs = model_inputs(conv_net(2))
    runs = split_feed({"x": np.arange(5 * 192, dtype=np.float32).reshape(5, 3, 8, 8)}, specs)
    assert [r["x"].shape[0] for r in runs] == [2, 2] and runs[1]["x"][0, 0, 0, 0] == 2 * 192
    with pytest.raises(InputError, match="batches of exactly 2 samples; the data gave 1"):
        split_feed({"x": np.zeros((1, 3, 8, 8), np.float32)}, specs)


def test_shared_scalar_and_state_on_axis_one():
    """silero's layout with a fixed batch of 1: `input [1, 512]`, `state [2, N, 128]`, `sr` scalar."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["out"])],
        "g",
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 512]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "N", 128]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 512])],
    )
    specs = model_inputs(helper.make_model(graph))
    assert fixed_batch(specs) == 1
    feed = {
        "input": R.normal(size=(3, 512)).astype(np.float32),
        "state": R.normal(size=(2, 3, 128)).astype(np.float32),
        "sr": np.array(16000, np.int64),
    }
    runs = split_feed(feed, specs)
    assert len(runs) == 3
    for i, run in enumerate(runs):
        np.testing.assert_array_equal(run["input"], feed["input"][i : i + 1])
        np.testing.assert_array_equal(run["state"], feed["state"][:, i : i + 1])
        assert run["sr"] is feed["sr"]


def test_validate_a_fixed_batch_model_like_its_free_batch_twin(tmp_path):
    x = R.normal(size=(10, 3, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=R.integers(0, 4, 10))
    reports = {}
    for batch in (1, "N"):
        m = conv_net(batch)
        policy = Policy.uniform(analyze(m).names, 4)
        q = quantize_model(m, policy, data={"x": x}, calibration="minmax")  # calibrates 10 samples at once
        onnx.save(m, tmp_path / f"fp_{batch}.onnx")
        onnx.save(q, tmp_path / f"q_{batch}.onnx")
        reports[batch] = validate(
            tmp_path / f"q_{batch}.onnx", tmp_path / f"fp_{batch}.onnx", tmp_path / "d.npz", batch_size=4
        )
    one, free = reports[1], reports["N"]
    assert one.samples == free.samples == 10
    assert one.top1_agreement == free.top1_agreement and one.reference_top1 == free.reference_top1
    assert one.outputs[0].sqnr_db == pytest.approx(free.outputs[0].sqnr_db, rel=1e-4)
    assert [lat.batch for lat in one.latency] == [1]


def test_backend_module_knows_the_fixed_batch():
    from mqtool.backend import to_torch

    assert to_torch(conv_net(1)).fixed_batch == 1 and to_torch(conv_net("N")).fixed_batch is None
