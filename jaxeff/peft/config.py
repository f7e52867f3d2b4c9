"""The `peft` config section: parameter-efficient fine-tuning (methods lora, qlora, bitfit).

LoRA / QLoRA adapt every ``nn.Dense`` whose module path (``layers_0/attn/q``; the kernel's
parameter path without ``/kernel``) fully matches one of ``targets``. BitFit reads only
``train_norms``.
"""

from typing import Literal

from pydantic import Field

from jaxeff.targets import BLOCK_PROJECTIONS
from jaxeff.schema import Section

DEFAULT_TARGETS = BLOCK_PROJECTIONS  # the attention and MLP projections of every block (jaxeff.targets)


class PeftConfig(Section):
    # LoRA / QLoRA: W + (alpha / rank) · A B with A [in, rank] random and B [rank, out] zero
    rank: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # on the adapter input (training only)
    targets: tuple[str, ...] = DEFAULT_TARGETS  # regexes over module paths, e.g. layers_\d+/attn/q
    adapter_dtype: Literal["float32", "bfloat16"] | None = None  # None: float32 (lora), bfloat16 (qlora)
    # start the adapters from a folder (Hugging Face PEFT LoRA, or jaxeff export-adapter) instead of
    # A random / B zero; its r and scale must equal rank and alpha / rank, its modules be targets
    init_adapter: str | None = None
    # QLoRA: the frozen base kernels as NF4 (block 64) with double-quantized absmax constants
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # qlora matmuls
    # quantized matmul backend: auto = the Pallas kernel on GPU/TPU, the jnp dequantize-then-matmul
    # reference on CPU (Pallas interpret mode is too slow to train with); or any pallas_kernels backend
    kernel_backend: Literal["auto", "gpu", "tpu", "interpret", "tpu_interpret", "reference"] = "auto"
    # BitFit: train the biases (model.use_bias must be true) and, optionally, the RMSNorm scales
    train_norms: bool = False
