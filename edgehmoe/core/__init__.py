"""The numpy core: the class tree, top-down routing and decoding, information metrics, and the
model-directory format. Imports numpy and safetensors only (no torch, onnxruntime or paho), so
every other layer, the Pi included, can use it."""
