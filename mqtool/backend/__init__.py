"""PyTorch backend: run any ONNX graph as an `nn.Module` with swappable, fake-quantizable layers.

    from mqtool.backend import to_torch, WeightFakeQuant, ActFakeQuant

    module = to_torch(model)                       # OnnxModule
    module.layers["/conv1/Conv"].weight_quant = WeightFakeQuant.from_weight(w, bits=4)
    module.set_act_quant("/relu/Relu_output_0", ActFakeQuant.from_range(0.0, 6.0, bits=8))
    y = module(x)

See docs/backend.md. Importing this package imports torch; `mqtool` itself does not.
"""

from mqtool.backend.fake_quant import ActFakeQuant, WeightFakeQuant, fake_quantize, quantize_weight_ste
from mqtool.backend.graph import OnnxModule, to_torch
from mqtool.backend.layers import QuantLayer
from mqtool.backend.ops import register, supported_ops

__all__ = [
    "ActFakeQuant",
    "OnnxModule",
    "QuantLayer",
    "WeightFakeQuant",
    "fake_quantize",
    "quantize_weight_ste",
    "register",
    "supported_ops",
    "to_torch",
]
