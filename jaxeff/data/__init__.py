"""Data pipeline: tokenizers, the embedded synthetic corpus, local files via Hugging Face ``datasets``,
document packing, and a deterministic, resumable mixture loader. Pure numpy + python (no jax).

User mistakes raise ``jaxeff.errors.DataError`` with a one-line message naming the field.
"""

from .files import load_text_documents
from .loader import BATCH_KEYS, MixtureLoader, eval_batches, process_slice
from .packing import PACKED_KEYS, pack_documents, pack_texts
from .synthetic import DEFAULT_DOC_LEN, DOMAIN_DESCRIPTIONS, DOMAINS, MIN_DOC_LEN, generate_documents
from .tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BATCH_KEYS",
    "ByteTokenizer",
    "DEFAULT_DOC_LEN",
    "DOMAINS",
    "DOMAIN_DESCRIPTIONS",
    "HFTokenizer",
    "MIN_DOC_LEN",
    "MixtureLoader",
    "PACKED_KEYS",
    "Tokenizer",
    "eval_batches",
    "generate_documents",
    "load_text_documents",
    "load_tokenizer",
    "pack_documents",
    "pack_texts",
    "process_slice",
]
