"""Quantized matmuls: int8 / int4 / NF4 weight-only kernels with fused dequantization and W8A8 (LLM.int8()).

Pallas kernels on the Triton backend (``backend="gpu"``), the same kernels in interpret mode on CPU
(``backend="interpret"``) and a pure-jnp reference (``backend="reference"``). Depends on jax only.
"""

from .api import int8_matmul, quantized_matmul
from .formats import NF4_CODEBOOK, QuantizedWeight, dequantize, quantize

__all__ = ["QuantizedWeight", "quantize", "dequantize", "quantized_matmul", "int8_matmul", "NF4_CODEBOOK"]
