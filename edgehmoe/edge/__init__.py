"""What a device runs to predict: the ONNX bundle format and the ONNX Runtime chain.
Imports onnxruntime, numpy and :mod:`edgehmoe.core` only, never torch."""
