"""mqtool: mixed-precision quantization of ONNX models (MetaQuantNet + genetic search, QDQ emission).

Importing the package is cheap: nothing here imports torch. The public API lives in the submodules
(`mqtool.model`, `mqtool.analysis`, `mqtool.policy`, `mqtool.numerics`, ...).
"""

__version__ = "0.1.0"
