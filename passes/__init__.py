"""ONNX graph passes: each takes a model and returns it plus whether it changed (see passes/base.py)."""
