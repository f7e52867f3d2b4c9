"""Parameter-efficient fine-tuning: LoRA, QLoRA, BitFit (methods `lora`, `qlora`, `bitfit`).

Importing this package registers the three methods with the trainer.
"""

from jaxeff.peft.bitfit import bitfit_mask, bitfit_method
from jaxeff.peft.lora import (adapter_axes, apply_lora, init_adapters, lora_interceptor, lora_method, merge,
                              switch, target_paths, unmerge)
from jaxeff.peft.qlora import dequantize_base, qbase_stats, qlora_method, quantize_base, strip_kernels

__all__ = ["bitfit_mask", "bitfit_method", "adapter_axes", "apply_lora", "init_adapters", "lora_interceptor",
           "lora_method", "merge", "switch", "target_paths", "unmerge", "dequantize_base", "qbase_stats",
           "qlora_method", "quantize_base", "strip_kernels"]
