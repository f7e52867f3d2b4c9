"""TransformerConfig: the architecture of a LLaMA-style decoder, validated on construction."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class RopeScaling:
    """RoPE frequency scaling for long context. ``llama3``: Llama 3.1's piecewise scaling (high
    frequencies kept, low ones divided by ``factor``, a smooth ramp between); ``linear``: every
    frequency divided by ``factor`` (position interpolation)."""

    type: Literal["llama3", "linear"] = "llama3"
    factor: float = Field(8.0, gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_position_embeddings: int = Field(8192, gt=0)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TransformerConfig:
    """Architecture hyper-parameters. ``None`` fields are derived (see the properties below).

    ``sliding_window`` is the number of visible tokens including the current one (query i sees
    keys j with i - window < j <= i), as in Mistral / Hugging Face. It is one int for every layer,
    or a tuple with one entry per layer (``null`` = full attention in that layer).
    """

    vocab_size: int = Field(264, gt=0)
    d_model: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)  # None = n_heads (MHA); 1 = MQA
    head_dim: int | None = Field(None, gt=0)  # None = d_model // n_heads
    d_ff: int | None = Field(None, gt=0)  # None = 8/3 d_model rounded up to a multiple of 64
    max_seq_len: int = Field(2048, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    use_bias: bool = False  # biases on every Dense (BitFit trains only these)
    qkv_bias: bool = False  # biases on the q/k/v projections only (Qwen2); implied by use_bias
    tie_embeddings: bool = True
    sliding_window: int | tuple[int | None, ...] | None = None
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    attention_impl: Literal["auto", "xla", "cudnn", "pallas"] = "auto"
    remat: bool = False  # rematerialise each block in the backward pass
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _check(self):
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim")
        if isinstance(self.sliding_window, tuple) and len(self.sliding_window) != self.n_layers:
            raise ValueError(f"sliding_window has {len(self.sliding_window)} entries, expected one per layer (n_layers={self.n_layers})")
        for w in self.windows:
            if w is not None and w < 1:
                raise ValueError(f"sliding_window entries must be >= 1 (got {w})")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def ff(self) -> int:
        return self.d_ff or 64 * -(-(8 * self.d_model // 3) // 64)

    @property
    def windows(self) -> tuple[int | None, ...]:
        if isinstance(self.sliding_window, tuple):
            return self.sliding_window
        return (self.sliding_window,) * self.n_layers

    def param_count(self, *, embeddings: bool = True) -> int:
        """Exact number of parameters of :class:`jaxeff.models.Transformer` with this config."""
        d, h, kvh, hd, ff = self.d_model, self.n_heads, self.kv_heads, self.hd, self.ff
        b = self.use_bias
        qkv_b = b or self.qkv_bias
        attn = d * h * hd + 2 * d * kvh * hd + h * hd * d + qkv_b * (h * hd + 2 * kvh * hd) + b * d
        mlp = 3 * d * ff + b * (2 * ff + d)
        per_layer = attn + mlp + 2 * d
        n = self.n_layers * per_layer + d
        if embeddings:
            n += self.vocab_size * d
        if not self.tie_embeddings:
            n += d * self.vocab_size + b * self.vocab_size
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention
        scores and values (12 · layers · heads · head_dim · seq_len), as in the PaLM appendix."""
        matmul_params = self.param_count(embeddings=False) - (2 * self.n_layers + 1) * self.d_model
        if self.tie_embeddings:
            matmul_params += self.vocab_size * self.d_model  # the output projection is a matmul
        attn = 12 * self.n_layers * self.n_heads * self.hd * seq_len
        return 6.0 * matmul_params + attn
