"""Quantization: quantizers, fake quant / QAT (method `qat`), PTQ, conversion to low-bit kernels."""
