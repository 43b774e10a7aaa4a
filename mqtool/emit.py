"""Emission: a float ONNX model + a `Policy` (+ optional finetuned `QuantParams`) -> a QDQ ONNX model.

    prepare -> plan_model (plan_quantizers per graph) -> calibrate -> plan_model_storage ->
    upgrade_opset -> insert_qdq -> insert_subgraph_qdq -> gemm_to_matmul -> pack_weights -> cleanup ->
    dedupe_initializers -> set_metadata (-> compact_names, for packed storage)

Layers inside If/Loop bodies are planned and emitted by `passes.subgraph_qdq`; their activations are
calibrated through the PyTorch backend (ONNX Runtime cannot output body tensors), and a tensor of a branch
the calibration data never takes stays float.

`quantize_model` is the library function (model in, model out); `convert` is the file-level function behind
`mqtool convert` (load, take a policy from a pluggable `PolicySource`, emit, save atomically). The caller's
model is never modified; the pipeline deep-copies it once (in `prepare`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import onnx

from calibration.calibrate import CalibrationOptions, calibrate
from calibration.readers import DataSource
from mqtool import __version__
from mqtool.analysis import ModelInfo, analyze
from mqtool.errors import InputError
from mqtool.fileio import atomic_write_bytes
from mqtool.model import load_model, over_protobuf_limit
from mqtool.numerics import activation_qparams
from mqtool.policy import FLOAT, FLOAT_INPUT_FORMATS, Format, LayerBits, Policy, average_weight_bits
from passes.base import run_passes
from passes.cleanup import cleanup
from passes.compact_names import compact_names
from passes.dedupe_initializers import dedupe_initializers
from passes.gemm_to_matmul import gemm_to_matmul
from passes.graph import default_opset
from passes.insert_qdq import insert_qdq
from passes.pack_weights import pack_weights
from passes.pipeline import prepare
from passes.qdq_plan import (
    ActivationPlan,
    ActQuant,
    Storage,
    WeightStorage,
    check_policy_names,
    required_opset,
)
from passes.qparams import QuantParams
from passes.set_metadata import set_metadata
from passes.subgraph_qdq import ModelPlan, insert_subgraph_qdq, plan_model, plan_model_storage
from passes.upgrade_opset import upgrade_opset

log = logging.getLogger(__name__)

META_VERSION = "mqtool.version"
META_POLICY = "mqtool.policy"
META_STORAGE = "mqtool.storage"
META_CALIBRATION = "mqtool.calibration"

PolicySource = Callable[[onnx.ModelProto, ModelInfo], tuple[Policy, QuantParams | None]]
"""Produces the policy (and optional finetuned parameters) for a prepared model and its analysis."""


def uniform_policy(bits: int, act_bits: int = 8) -> PolicySource:
    """Every quantizable layer at `bits` weight bits and `act_bits` input bits (32 = float input)."""

    def source(model: onnx.ModelProto, info: ModelInfo) -> tuple[Policy, QuantParams | None]:
        p = Policy.uniform(info.names, bits, act_bits)
        p.meta = {"source": f"uniform w{bits}a{act_bits}"}
        return p, None

    return source


def policy_file(path: str) -> PolicySource:
    """The policy JSON at `path`, checked against the model's layer names; missing layers stay float."""

    def source(model: onnx.ModelProto, info: ModelInfo) -> tuple[Policy, QuantParams | None]:
        return Policy.load(path, known=info.names), None

    return source


def quantize_model(
    model: onnx.ModelProto,
    policy: Policy,
    *,
    data: DataSource | None = None,
    calibration: str | CalibrationOptions = "percentile",
    storage: Storage | str = Storage.AUTO,
    qparams: QuantParams | None = None,
) -> onnx.ModelProto:
    """The QDQ model of `model` under `policy` (`model` itself is not modified).

    `data` (a data file path, a `mqtool.data.Dataset`, arrays or a CalibrationDataReader) calibrates the
    activation ranges that `qparams` does not give; it is required when the policy quantizes activations.
    """
    prepared = prepare(model)
    return _emit(prepared, analyze(prepared), policy, data, calibration, storage, qparams)


def _emit(
    prepared: onnx.ModelProto,
    info: ModelInfo,
    policy: Policy,
    data: DataSource | None,
    calibration: str | CalibrationOptions,
    storage: Storage | str,
    qparams: QuantParams | None,
) -> onnx.ModelProto:
    """Emit from a prepared model, consuming it (the passes run on it in place)."""
    check_policy_names(info, policy)
    storage = _storage(storage)
    options = (
        calibration if isinstance(calibration, CalibrationOptions) else CalibrationOptions(method=calibration)
    )
    qparams = qparams or QuantParams()
    model_plan = plan_model(prepared, info, policy)
    plan = model_plan.merged().bits
    qparams.check(info.layers, plan)
    acts = _activation_params(prepared, info, model_plan, qparams, data, options)
    if len(acts) < len(plan):  # tensors of branches no calibration sample reaches: left float
        model_plan = model_plan.without(set(plan) - set(acts))
    quantizers = model_plan.merged()
    layout = plan_model_storage(prepared, info, policy, quantizers.all_bits(), storage)
    main = model_plan.scopes.get((), ActivationPlan({}))
    main_info = replace(info, layers=[x for x in info.layers if not x.subgraph])
    main_layout = {x.name: layout[x.name] for x in main_info.layers if x.name in layout}
    opset = required_opset(layout, default_opset(prepared))
    meta = _metadata(storage, _realised(policy, layout), options if acts else None)
    passes = [
        partial(upgrade_opset, opset=opset),
        partial(
            insert_qdq,
            policy=policy,
            activations={t: acts[t] for t in main.bits},
            qparams=qparams,
            info=main_info,
            carried=main.carried,
            constants=main.constants,
            layout=main_layout,
        ),
        partial(
            insert_subgraph_qdq,
            policy=policy,
            plan=model_plan,
            activations=acts,
            qparams=qparams,
            info=info,
            layout=layout,
        ),
        partial(gemm_to_matmul, layers=[k for k, w in main_layout.items() if w.as_matmul]),
        partial(
            pack_weights,
            containers={k: w.container for k, w in main_layout.items() if not _gathers(k, w, info)},
        ),
        partial(cleanup, keep_value_info=False),
        dedupe_initializers,
        partial(set_metadata, props=meta),
    ]
    if storage is Storage.PACKED:
        # The smallest file: internal tensor names shortened (layers, inputs and outputs keep theirs).
        passes.append(partial(compact_names, keep=info.names))
    return run_passes(prepared, passes, copy=False).model


def _gathers(name: str, ws: WeightStorage, info: ModelInfo) -> bool:
    """An embedding emitted as GatherBlockQuantized (its own storage, no DequantizeLinear to pack)."""
    return ws.format is Format.NBITS and info.layer(name).op_type == "Gather"


def _realised(policy: Policy, layout: dict[str, WeightStorage]) -> Policy:
    """The policy with each quantized layer's format (and block size) as emitted: what the file records."""
    layers = dict(policy.layers)
    for name, b in policy.layers.items():
        if b.weight_bits != FLOAT and name not in layout:  # not emitted
            layers[name] = LayerBits(FLOAT, FLOAT, Format.FLOAT)
    for name, ws in layout.items():
        b = policy.get(name)
        # An nbits or dynamic layer reads a float input (auto picks nbits only where the input stays float).
        act = FLOAT if ws.format in FLOAT_INPUT_FORMATS else b.act_bits
        layers[name] = LayerBits(b.weight_bits, act, ws.format, ws.block_size)
    return Policy(layers, dict(policy.meta))


def _storage(storage: Storage | str) -> Storage:
    try:
        return Storage(storage)
    except ValueError as e:
        raise InputError(f"storage '{storage}' not in {', '.join(s.value for s in Storage)}") from e


def _activation_params(
    model: onnx.ModelProto,
    info: ModelInfo,
    model_plan: ModelPlan,
    qparams: QuantParams,
    data: DataSource | None,
    options: CalibrationOptions,
) -> dict[str, ActQuant]:
    """Tensor -> quantizer parameters for every planned tensor that has them (overrides, else calibrated);
    a tensor inside a body that no calibration sample reaches is left out."""
    plan = model_plan.merged().bits
    overrides = qparams.activations
    todo = {t: b for t, b in plan.items() if t not in overrides}
    ranges: dict[str, tuple[float, float]] = {}
    if todo:
        if data is None:
            widths = sorted(set(todo.values()))
            raise InputError(
                f"data: the policy quantizes activations ({len(todo)} tensors at {'/'.join(map(str, widths))} "
                "bits), so calibration data is needed; or quantize weights only (activation bits 32)",
                field="data",
            )
        inside = {t for scope, p in model_plan.scopes.items() if scope for t in p.bits}
        reader = None
        if inside & set(todo):  # ONNX Runtime cannot output tensors inside If/Loop bodies
            from mqtool.backend import to_torch

            reader = to_torch(model, info).read_tensors
        ranges = calibrate(model, todo, data, options, subgraph_reader=reader)
    acts = {}
    for t, bits in plan.items():
        a = overrides.get(t)
        if a is None and t not in ranges:
            continue
        if a is not None and a.range is None:
            acts[t] = ActQuant(bits, float(a.scale), int(a.zero_point))
            continue
        lo, hi = a.range if a is not None else ranges[t]
        scale, zp = activation_qparams(lo, hi, bits)
        acts[t] = ActQuant(bits, float(scale), int(zp))
    return acts


def _metadata(storage: Storage, policy: Policy, calibration: CalibrationOptions | None) -> dict[str, str]:
    # The policy is the per-layer record: `mqtool report` checks its weight_bits against the integers in
    # the graph (activation bits and containers are read from the graph alone).
    meta = {
        META_VERSION: __version__,
        META_POLICY: json.dumps(policy.to_json(), sort_keys=True, separators=(",", ":")),
        META_STORAGE: storage.value,
    }
    if calibration is not None:
        meta[META_CALIBRATION] = calibration.method
    return meta


@dataclass
class ConvertResult:
    """What `convert` wrote, for the CLI's one-line summary."""

    output: str
    layers: int
    quantized: int
    float_layers: int
    not_in_policy: int
    avg_weight_bits: float
    bytes: int
    input_bytes: int
    storage: str

    def summary(self) -> str:
        missing = f" ({self.not_in_policy} not in the policy)" if self.not_in_policy else ""
        return (
            f"{self.output}: {self.quantized}/{self.layers} layers quantized, avg {self.avg_weight_bits:.2f} "
            f"weight bits, {self.float_layers} float{missing}; {_size(self.bytes)} "
            f"(input {_size(self.input_bytes)}), storage {self.storage}"
        )


def convert(
    model_path: str,
    output: str,
    source: PolicySource,
    *,
    data: DataSource | None = None,
    calibration: str | CalibrationOptions = "percentile",
    storage: Storage | str = Storage.AUTO,
) -> ConvertResult:
    """Quantize the model file at `model_path` under the policy `source` gives and write it to `output`.

    Refuses to overwrite the input; writes atomically (a failure leaves no file); same inputs give the same
    bytes.
    """
    check_output_path(model_path, output)
    prepared = prepare(load_model(model_path))
    info = analyze(prepared)
    if not info.layers:
        raise InputError(
            f"{model_path}: no quantizable layer (Conv, ConvTranspose, Gemm or MatMul with a constant "
            "weight): nothing to convert"
        )
    policy, qparams = source(prepared, info)
    qmodel = _emit(prepared, info, policy, data, calibration, storage, qparams)
    save_model_atomic(qmodel, output)
    quantized = sum(1 for layer in info.layers if policy.get(layer.name).weight_bits != FLOAT)
    return ConvertResult(
        output=output,
        layers=len(info.layers),
        quantized=quantized,
        float_layers=len(info.layers) - quantized,
        not_in_policy=sum(1 for layer in info.layers if layer.name not in policy.layers),
        avg_weight_bits=average_weight_bits(policy, info.layers),
        bytes=_file_bytes(output),
        input_bytes=os.path.getsize(model_path),
        storage=_storage(storage).value,
    )


def check_output_path(model_path: str, output: str) -> None:
    """Raise `InputError` when `output` is the input model (also via symlinks/hard links) or unwritable."""
    if os.path.realpath(output) == os.path.realpath(model_path) or (
        os.path.exists(output) and os.path.exists(model_path) and os.path.samefile(output, model_path)
    ):
        raise InputError(f"{output}: refusing to overwrite the input model (choose another -o)")
    if os.path.isdir(output):
        raise InputError(f"{output}: is a directory, expected an output .onnx file path")
    parent = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(parent):
        raise InputError(f"{output}: directory {parent} does not exist")


def save_model_atomic(model: onnx.ModelProto, path: str) -> None:
    """Write `model` to `path` atomically (`mqtool.fileio`: a temporary file in the same folder, then
    `os.replace`). Models of 2 GiB or more keep their tensors in `<name>.data` next to `path`; that file is
    moved into place before the model, so a reader never sees a model without its data."""
    if not over_protobuf_limit(model):
        atomic_write_bytes(path, model.SerializeToString())
        return
    directory, base = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    tmpdir = tempfile.mkdtemp(prefix=f".{base}.", dir=directory)
    try:
        location = base + ".data"
        onnx.save_model(
            model,
            os.path.join(tmpdir, base),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=location,
            size_threshold=1024,
        )
        umask = os.umask(0)
        os.umask(umask)
        for name in (base, location):  # onnx creates the data file 0600; outputs get the umask's permissions
            os.chmod(os.path.join(tmpdir, name), 0o666 & ~umask)
        data, backup = os.path.join(directory, location), os.path.join(tmpdir, "previous.data")
        with contextlib.suppress(OSError):  # a previous output's data, put back if the model cannot follow
            os.link(data, backup)
        os.replace(os.path.join(tmpdir, location), data)
        try:
            os.replace(os.path.join(tmpdir, base), path)
        except BaseException:  # no data file without its model
            with contextlib.suppress(OSError):
                if os.path.exists(backup):
                    os.replace(backup, data)
                else:
                    os.unlink(data)
            raise
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _file_bytes(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    return size + (os.path.getsize(data) if os.path.exists(data) else 0)


def _size(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
