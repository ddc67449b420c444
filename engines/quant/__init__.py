"""Quantization for the ``quantized`` engine: formats (the math), CPU kernels and the torchao backend."""
