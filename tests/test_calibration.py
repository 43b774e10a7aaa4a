"""Data files (mqtool.data), calibration readers, streaming observers and `calibrate`."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper, parser

from calibration.calibrate import CalibrationOptions, calibrate
from calibration.observers import Observer, StreamingHistogram
from calibration.readers import iter_feeds
from mqtool.data import load_labelled, open_data
from mqtool.errors import InputError
from mqtool.numerics import activation_qparams, fake_quantize, int_range

RNG = np.random.default_rng(2)


def model(batch: str = "N") -> onnx.ModelProto:
    m = parser.parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[{batch}, 3, 4, 4] img, float[{batch}, 5] aux) => (float[{batch}, 5] y) {{
          f = Flatten(img)
          h = MatMul(f, W)
          r = Relu(h)
          y = Add(r, aux)
        }}"""
    )
    m.graph.initializer.append(numpy_helper.from_array(RNG.normal(size=(48, 5)).astype(np.float32), "W"))
    return m


def arrays(n=50):
    return {
        "img": RNG.normal(size=(n, 3, 4, 4)).astype(np.float32),
        "aux": RNG.normal(size=(n, 5)).astype(np.float32),
        "y": RNG.integers(0, 5, n).astype(np.int64),
    }


def test_npz_and_npy_dir_stream_the_same_batches(tmp_path):
    a = arrays(50)
    np.savez_compressed(tmp_path / "d.npz", **a)
    os.mkdir(tmp_path / "dir")
    for k, v in a.items():
        np.save(tmp_path / "dir" / f"{k}.npy", v)
    for path in (tmp_path / "d.npz", tmp_path / "dir"):
        ds = open_data(path, model())
        assert ds.num_samples == 50 and ds.input_names == ["img", "aux"]
        np.testing.assert_array_equal(ds.labels, a["y"])
        batches = list(ds.batches(16))
        assert [len(b["img"]) for b in batches] == [16, 16, 16, 2]
        np.testing.assert_array_equal(np.concatenate([b["aux"] for b in batches]), a["aux"])
        assert len(list(ds.batches(16, limit=20))) == 2
    inputs, labels = load_labelled(tmp_path / "d.npz", model(), limit=10)
    assert inputs["img"].shape == (10, 3, 4, 4) and len(labels) == 10


def test_single_input_may_be_called_x_and_fixed_batch_is_respected(tmp_path):
    m = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Relu", ["inp"], ["out"])],
            "g",
            [onnx.helper.make_tensor_value_info("inp", onnx.TensorProto.FLOAT, [4, 2])],
            [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4, 2])],
        )
    )
    np.savez(tmp_path / "d.npz", x=RNG.normal(size=(10, 2)))  # float64 data for a float32 input is accepted
    ds = open_data(tmp_path / "d.npz", m)
    shapes = [b["inp"].shape for b in ds.batches(3)]
    assert shapes == [(4, 2), (4, 2)] and ds.batches(3).__next__()["inp"].dtype == np.float32


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.pop("aux"), "no array for model input 'aux'"),
        (lambda a: a.update(extra=a["aux"]), "array 'extra' is not a model input"),
        (lambda a: a.update(img=a["img"][:, :2]), "array 'img' has shape"),
        (lambda a: a.update(img=(a["img"] * 255).astype(np.uint8)), "dtype uint8"),
        (lambda a: a.update(y=a["y"][:3]), "3 labels for 50 samples"),
        (lambda a: a.update(y=a["aux"]), "integer class labels"),
        (lambda a: a.update(img=a["img"][:0], aux=a["aux"][:0], y=a["y"][:0]), "is empty"),
        (lambda a: a.update(aux=a["aux"][:7]), "different numbers of samples"),
    ],
)
def test_bad_data_files_name_the_file_and_array(tmp_path, mutate, message):
    a = arrays(50)
    mutate(a)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(InputError, match=message) as e:
        open_data(path, model())
    assert str(path) in str(e.value)


def test_nan_is_reported_with_the_sample_and_pickles_are_refused(tmp_path):
    a = arrays(50)
    a["img"][33, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", **a)
    with pytest.raises(InputError, match=r"array 'img' contains NaN or Inf \(sample 33\)"):
        list(open_data(tmp_path / "nan.npz", model()).batches(16))
    np.savez(tmp_path / "obj.npz", img=np.array([object()] * 3), aux=a["aux"])
    with pytest.raises(InputError, match="pickle"):
        open_data(tmp_path / "obj.npz", model())
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="junk.npz"):
        open_data(tmp_path / "junk.npz", model())


def test_reader_protocol_and_arrays():
    a = arrays(20)

    class Reader:
        def __init__(self):
            self.it = iter(
                [{"img": a["img"][i : i + 8], "aux": a["aux"][i : i + 8]} for i in range(0, 20, 8)]
            )

        def get_next(self):
            return next(self.it, None)

    got = list(iter_feeds(Reader(), model()))
    assert [len(f["img"]) for f in got] == [8, 8, 4]
    assert [len(f["aux"]) for f in iter_feeds({"img": a["img"], "aux": a["aux"]}, model(), batch_size=7)] == [
        7,
        7,
        6,
    ]
    with pytest.raises(InputError, match="no data for model input 'aux'"):
        list(iter_feeds({"img": a["img"]}, model()))


def test_histogram_doubling_is_exact():
    x = RNG.normal(size=10_000).astype(np.float32)
    one = StreamingHistogram(64)
    one.update(np.concatenate([x * 0.1, x * 3]))
    streamed = StreamingHistogram(64)
    streamed.update(x * 0.1)  # sets R small, then doubles several times
    streamed.update(x * 3)
    assert streamed.limit == one.limit
    # Merged bins differ from direct binning only for values within float rounding of a bin edge.
    assert np.abs(streamed.counts - one.counts).sum() <= 4
    assert streamed.total == one.total == 20_000


def test_observer_ranges():
    x = RNG.normal(size=200_000).astype(np.float32)
    x[:3] = [40.0, -35.0, 0.0]  # outliers
    obs = Observer()
    for chunk in np.array_split(x, 7):
        obs.update(chunk)
    assert obs.range("minmax") == (-35.0, 40.0)
    lo, hi = obs.range("percentile", percentile=99.9)
    assert -3.5 < lo < -2.9 and 2.9 < hi < 3.5  # the 0.1% / 99.9% quantiles of N(0, 1): +-3.09

    def mse(r, bits=8):
        s, z = activation_qparams(*r, bits)
        return float(np.mean((fake_quantize(x, s, z, *int_range(bits, signed=False)) - x) ** 2))

    for bits in (8, 4):
        best = mse(obs.range("mse", bits), bits)
        assert (
            best <= mse(obs.range("minmax"), bits) and best <= mse(obs.range("percentile", bits), bits) * 1.02
        )
    # Entropy clips the two outliers, strictly inside the data range by a wide margin, around the whole bulk.
    lo, hi = obs.range("entropy", bits=8)
    q_lo, q_hi = np.quantile(x, [1e-4, 1 - 1e-4])
    assert 0.75 * -35 < lo < q_lo and q_hi < hi < 0.75 * 40
    # Heavy tails (Student t, 3 degrees of freedom): the range still ends well inside the extremes (at 47%
    # of them for this seed) and keeps the central 99.8%.
    t = np.random.default_rng(0).standard_t(3, size=200_000).astype(np.float32)
    heavy = Observer()
    for chunk in np.array_split(t, 7):
        heavy.update(chunk)
    lo, hi = heavy.range("entropy", bits=8)
    q_lo, q_hi = np.quantile(t, [1e-3, 1 - 1e-3])
    assert 0.75 * t.min() < lo < q_lo and q_hi < hi < 0.75 * t.max()
    assert obs.range("mse", bits=4)[1] < obs.range("mse", bits=8)[1]  # fewer levels: a tighter range
    relu = Observer()
    relu.update(np.maximum(x, 0))  # half exact zeros: the zero spike must not shrink the range
    assert relu.range("entropy", bits=8)[1] > 2 and relu.range("mse", bits=8)[1] > 2


def test_calibrate_matches_numpy_and_does_not_touch_the_model(tmp_path):
    a = arrays(40)
    np.savez(tmp_path / "d.npz", **a)
    m = model()
    before = m.SerializeToString()
    w = numpy_helper.to_array(m.graph.initializer[0])
    h = a["img"].reshape(40, -1) @ w
    ranges = calibrate(
        m, {"f": 8, "r": 8, "h": 8}, tmp_path / "d.npz", CalibrationOptions("minmax", batch_size=16)
    )
    assert m.SerializeToString() == before
    np.testing.assert_allclose(ranges["h"], (h.min(), h.max()), rtol=1e-5)
    np.testing.assert_allclose(ranges["r"], (0.0, np.maximum(h, 0).max()), rtol=1e-5)
    # A percentile never exceeds the max. ORT's and NumPy's float32 matmuls differ in the last ulp, so the
    # bound is ORT's own max (same run, same arithmetic) and NumPy's up to float32 rounding.
    hi = calibrate(m, ["h"], tmp_path / "d.npz", "percentile")["h"][1]
    assert hi <= ranges["h"][1] and hi <= h.max() + 4 * np.finfo(np.float32).eps * np.abs(h).max()
    with pytest.raises(InputError, match="calibration method"):
        CalibrationOptions("kl")
