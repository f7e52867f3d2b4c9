"""The `ttt` config section (method ``ttt_e2e``): end-to-end test-time training.

Defaults follow the TTT-E2E paper (METHODS.md): inner SGD with learning rate 1.0 after clipping
the fast weights' joint gradient to global norm 1.0; the inner rate warms up linearly from 0.1x to
1x over the first 10% of the training steps (full rate at evaluation); fast MLPs in the last
quarter of the blocks. Cross-field checks (b <= window, b divides seq_len, block indices in range)
are in :func:`jaxeff.ttt.model.TTTSpec.from_config`, run when the method is built.
"""

from typing import Literal

from pydantic import Field

from jaxeff.schema import Section


class TTTConfig(Section):
    # tokens per inner mini-batch (one SGD step on the fast weights per b tokens); needs b <= the
    # sliding window and b dividing data.seq_len
    mini_batch: int = Field(16, gt=0)
    # block indices (0-based) that get a fast MLP; null = the last fast_fraction of the blocks (>= 1)
    fast_layers: tuple[int, ...] | None = None
    fast_fraction: float = Field(0.25, gt=0.0, le=1.0)
    fast_d_ff: int | None = Field(None, gt=0)  # hidden width of the fast SwiGLU MLPs; null = model's d_ff
    # parameter-matched (as the paper's E2E configs): the fast blocks' regular MLPs shrink so that the
    # model has as many parameters as the same model without TTT (fast MLPs as wide as the shrunk
    # ones unless fast_d_ff is set); see docs/ttt.md
    match_params: bool = False
    inner_lr: float = Field(1.0, ge=0.0)  # SGD learning rate of the inner step
    inner_clip: float | None = Field(1.0, gt=0.0)  # global-norm clip of the inner gradient (per sequence); null = off
    # inner-lr warm-up during training: linear from inner_lr * warmup_from to inner_lr over this
    # fraction of train.steps (0 = off); evaluation and generation use the full rate
    inner_lr_warmup_from: float = Field(0.1, ge=0.0, le=1.0)
    inner_lr_warmup_fraction: float = Field(0.1, ge=0.0, le=1.0)
    # self-attention of every block: sliding window (model.sliding_window) or none (a bigram-like
    # model: the paper's toy example)
    attention: Literal["window", "none"] = "window"
    remat: bool = True  # rematerialise each chunk of the inner loop in the backward pass
