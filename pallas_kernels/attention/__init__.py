"""FlashAttention (forward + backward) and flash-decoding as Pallas kernels (Triton GPU backend,
runnable on CPU in interpret mode), with a plain-jnp reference."""

from pallas_kernels.attention.api import flash_attention, flash_decode
from pallas_kernels.attention.common import BlockSizes
from pallas_kernels.attention.reference import attention_reference, decode_reference

__all__ = ["flash_attention", "flash_decode", "attention_reference", "decode_reference", "BlockSizes"]
