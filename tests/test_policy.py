"""The policy JSON contract: round trip, validation errors naming the field, average bits and BitOPs."""

from __future__ import annotations

import json

import pytest

from mqtool.analysis import LayerInfo
from mqtool.errors import InputError
from mqtool.policy import Format, LayerBits, Policy, average_weight_bits, bitops_ratio


def _layers():
    return [
        LayerInfo("a", "Conv", "wa", [10, 1, 1, 1], 10, "x", "ya", 100),
        LayerInfo("b", "Gemm", "wb", [30, 1], 30, "ya", "yb", 30),
    ]


def test_round_trip_and_average_bits():
    p = Policy({"a": LayerBits(2, 8), "b": LayerBits(6, 32)}, meta={"budget": 5})
    q = Policy.from_json(json.loads(p.dumps()), known=["a", "b"])
    assert q == p
    assert average_weight_bits(q, _layers()) == pytest.approx((2 * 10 + 6 * 30) / 40)
    # missing layers count as float (32 bits)
    assert average_weight_bits(Policy({"a": LayerBits(4, 8)}), _layers()) == pytest.approx((40 + 960) / 40)


def test_formats_round_trip_and_version_1_files_still_load(tmp_path):
    p = Policy(
        {
            "a": LayerBits(4, 8, Format.INT8),
            "b": LayerBits(2, 32, Format.NBITS, 32),
            "c": LayerBits(32, 32, Format.FLOAT),
            "d": LayerBits(3, 32),
            "e": LayerBits(6, 32, Format.DYNAMIC),
        }
    )
    doc = json.loads(p.dumps())
    assert doc["version"] == 3
    assert doc["layers"]["e"] == {"weight_bits": 6, "act_bits": 32, "format": "dynamic"}
    assert doc["layers"]["b"] == {"weight_bits": 2, "act_bits": 32, "format": "nbits", "block_size": 32}
    assert "format" not in doc["layers"]["d"]  # no format: the conversion's storage mode decides
    assert Policy.from_json(doc, known=list("abcde")) == p
    v2 = {**doc, "version": 2, "layers": {k: v for k, v in doc["layers"].items() if k != "e"}}
    assert Policy.from_json(v2).layers == {k: v for k, v in p.layers.items() if k != "e"}
    old = tmp_path / "v1.json"
    old.write_text(
        json.dumps(
            {"format": "mqtool.policy", "version": 1, "layers": {"a": {"weight_bits": 5, "act_bits": 8}}}
        )
    )
    loaded = Policy.load(str(old), known=["a", "b"])
    assert loaded.get("a") == LayerBits(5, 8, None, 0) and loaded.get("a").format is None
    with pytest.raises(ValueError, match="weight-only"):
        LayerBits(4, 8, Format.NBITS)


def test_bitops_ratio():
    p = Policy({"a": LayerBits(4, 8), "b": LayerBits(8, 8)})
    assert bitops_ratio(p, _layers()) == pytest.approx((100 * 32 + 30 * 64) / (130 * 64))
    assert bitops_ratio(Policy.uniform(["a", "b"], 8), _layers()) == 1.0


@pytest.mark.parametrize(
    "doc, field",
    [
        ([], "object"),
        ({"format": "x", "version": 1, "layers": {}}, "format"),
        ({"format": "mqtool.policy", "version": 4, "layers": {}}, "version"),
        ({"format": "mqtool.policy", "version": "1", "layers": {}}, "version"),
        ({"format": "mqtool.policy", "version": 1, "layers": []}, "layers"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"zz": {"weight_bits": 4}}}, "unknown layer"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"weight_bits": 9}}}, "weight_bits"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"weight_bits": 1}}}, "weight_bits"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"weight_bits": 4.0}}}, "integer"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"weight_bits": True}}}, "integer"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"act_bits": 16}}}, "act_bits"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"wbits": 4}}}, "unknown field"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": 4}}, "expected an object"),
        ({"format": "mqtool.policy", "version": 1, "layers": {"a": {"format": "int8"}}}, "need version 2"),
        ({"format": "mqtool.policy", "version": 2, "layers": {"a": {"format": "int4"}}}, "format"),
        ({"format": "mqtool.policy", "version": 2, "layers": {"a": {"format": "float"}}}, "weight_bits 32"),
        (
            {"format": "mqtool.policy", "version": 2, "layers": {"a": {"weight_bits": 32, "format": "int8"}}},
            "cannot take format",
        ),
        (
            {"format": "mqtool.policy", "version": 2, "layers": {"a": {"format": "nbits"}}},
            "act_bits must be 32",
        ),
        (
            {"format": "mqtool.policy", "version": 2, "layers": {"a": {"format": "int8", "block_size": 32}}},
            "block_size needs",
        ),
        (
            {"format": "mqtool.policy", "version": 3, "layers": {"a": {"format": "dynamic"}}},
            "quantizes its float input at run time",
        ),
        (
            {"format": "mqtool.policy", "version": 2, "layers": {"a": {"act_bits": 32, "format": "dynamic"}}},
            "needs version 3",
        ),
        (
            {
                "format": "mqtool.policy",
                "version": 2,
                "layers": {"a": {"act_bits": 32, "format": "nbits", "block_size": 24}},
            },
            "power of two",
        ),
    ],
)
def test_bad_documents_name_the_field(doc, field):
    with pytest.raises(InputError, match=field):
        Policy.from_json(doc, "p.json", known=["a", "b"])


def test_load_file_errors(tmp_path):
    with pytest.raises(InputError, match="no such"):
        Policy.load(str(tmp_path / "none.json"))
    p = tmp_path / "p.json"
    p.write_text('{"format": "mqtool.policy", "format": "x"}')
    with pytest.raises(InputError, match="duplicate key"):
        Policy.load(str(p))
    p.write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        Policy.load(str(p))
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InputError, match="not valid JSON"):
        Policy.load(str(p))
