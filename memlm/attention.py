"""The attention function memlm registers with transformers.

``attach`` registers ``memlm_attention`` under the name ``"memlm"`` with ``AttentionInterface`` and
switches only the attached model to it. Inside a session, the model's forward receives the
session's ``StreamState`` as the ``memlm_state`` keyword, which transformers hands to every
attention call; the state then attends over [XL cache ; segment] plus kNN memory. Called without
it, the function is plain SDPA attention, so an attached model still works as before outside
sessions. The registered mask function is transformers' own SDPA mask for the same reason: inside
a session the stream builds its causal mask over the cache itself.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTENTION_NAME = "memlm"


def memlm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    memlm_state=None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, q_heads, n, d]; key, value [batch, kv_heads, n, d] -> ([batch, n, q_heads, d], None)."""
    if memlm_state is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx; memlm needs it to find each layer's memory")
    return memlm_state.attend(layer, query, key, value, scaling), None


def register() -> None:
    """Make ``attn_implementation="memlm"`` available (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, memlm_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
