"""Property-based bad inputs: mutated model files and malformed policy documents never crash.

Every generated case must either load/parse or raise `InputError` (exit 2 at the CLI); any other exception
is a crash. About 700 cases per run (the counts are the `max_examples` below).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from mqtool.analysis import analyze
from mqtool.errors import InputError
from mqtool.model import load_model
from mqtool.policy import Policy


def _seed_model() -> bytes:
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "W1", "B1"], ["a"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="c1"),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node(
            "Conv", ["r", "W2"], ["b"], kernel_shape=[3, 3], group=4, pads=[1, 1, 1, 1], name="dw"
        ),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wf", "Bf"], ["y"], transB=1, name="fc"),
    ]
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(np.zeros(4, np.float32), "B1"),
        numpy_helper.from_array(rng.normal(size=(4, 1, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.normal(size=(10, 4)).astype(np.float32), "Wf"),
        numpy_helper.from_array(np.zeros(10, np.float32), "Bf"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


SEED = _seed_model()
SETTINGS = settings(
    max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True
)


def _load_or_input_error(tmp_path, data: bytes, tag: str) -> None:
    p = tmp_path / f"m_{hashlib.sha1(data).hexdigest()[:10]}_{tag}.onnx"
    p.write_bytes(data)
    before = hashlib.sha256(p.read_bytes()).hexdigest()
    try:
        analyze(load_model(p))
    except InputError as e:
        assert "\n" not in str(e)
        assert str(p) in str(e) or "node '" in str(e)
    assert hashlib.sha256(p.read_bytes()).hexdigest() == before  # the input is never modified


@SETTINGS
@given(cut=st.integers(0, len(SEED) - 1))
def test_truncated_models(tmp_path_factory, cut):
    _load_or_input_error(tmp_path_factory.mktemp("t"), SEED[:cut], "cut")


@SETTINGS
@given(flips=st.lists(st.tuples(st.integers(0, len(SEED) - 1), st.integers(0, 255)), min_size=1, max_size=20))
def test_byte_flipped_models(tmp_path_factory, flips):
    b = bytearray(SEED)
    for i, v in flips:
        b[i] = v
    _load_or_input_error(tmp_path_factory.mktemp("f"), bytes(b), "flip")


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.binary(min_size=0, max_size=3000))
def test_random_bytes(tmp_path_factory, data):
    _load_or_input_error(tmp_path_factory.mktemp("r"), data, "rand")


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-40, 40) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_entry = st.dictionaries(st.sampled_from(["weight_bits", "act_bits", "bits", ""]), _json, max_size=3) | _json
_doc = st.fixed_dictionaries(
    {},
    optional={
        "format": st.sampled_from(["mqtool.policy", "other"]) | _json,
        "version": st.sampled_from([1, 2, "1"]) | _json,
        "layers": st.dictionaries(st.sampled_from(["c1", "dw", "fc", "zz"]), _entry, max_size=4) | _json,
        "meta": _json,
    },
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(doc=_doc | _json)
def test_policy_documents(doc):
    try:
        p = Policy.from_json(doc, "p.json", known=["c1", "dw", "fc"])
    except InputError as e:
        assert str(e).startswith("p.json")
        return
    # whatever parses is valid and round-trips
    assert all(b.weight_bits in (2, 3, 4, 5, 6, 7, 8, 32) for b in p.layers.values())
    assert Policy.from_json(json.loads(p.dumps()), "again") == p


def test_seed_model_is_valid():
    onnx.checker.check_model(onnx.load_from_string(SEED), full_check=True)
