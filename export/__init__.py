"""Torch-free runtime and ONNX export of vertical bundles (imported as vertical.export)."""
