"""Parameter-efficient fine-tuning: LoRA, QLoRA, BitFit (methods `lora`, `qlora`, `bitfit`; registered
through jaxeff.train.methods.BUILTIN_METHOD_MODULES). Names load their module on first use, so that
``jaxeff.cli`` (which imports ``jaxeff.peft.cli`` for every command) does not import JAX."""

from jaxeff._lazy import lazy_getattr

_EXPORTS = {
    **{name: "jaxeff.peft.bitfit" for name in ("bitfit_mask", "bitfit_method")},
    **{
        name: "jaxeff.peft.lora"
        for name in ("adapter_axes", "apply_lora", "init_adapters", "lora_interceptor", "lora_method", "merge", "switch", "target_paths", "unmerge")
    },
    **{name: "jaxeff.peft.qlora" for name in ("dequantize_base", "qbase_stats", "qlora_method", "quantize_base", "strip_kernels")},
}
__getattr__ = lazy_getattr(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
