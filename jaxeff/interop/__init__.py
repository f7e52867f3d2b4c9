"""Hugging Face interop: local LLaMA-family checkpoints (Llama, Mistral, Qwen2, SmolLM2) in and out.

``load_pretrained(path) -> (model, params)``, ``save_pretrained(model, params, path)``; the run
folder conversions behind ``jaxeff convert`` are in :mod:`jaxeff.interop.convert`. See
``docs/interop.md``.
"""

from jaxeff.interop.hf import load_pretrained, model_config, save_pretrained
from jaxeff.interop.hf_config import ARCHITECTURES, config_from_hf, config_to_hf

__all__ = ["load_pretrained", "save_pretrained", "model_config", "config_from_hf", "config_to_hf", "ARCHITECTURES"]
