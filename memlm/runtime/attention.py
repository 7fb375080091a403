"""The attention functions memlm registers with transformers: they only route.

``attach`` registers one function per implementation a model had before (``"memlm"`` for SDPA,
``"memlm_eager"``, ``"memlm_flash_attention_2"``, ...) with ``AttentionInterface``, and the previous
implementation's own mask function under the same name with ``AttentionMaskInterface``. Called
outside a session, the function is the model's previous implementation, exactly (same function, same
arguments). Inside a session, the model's forward receives the session's ``StreamState`` as the
``memlm_state`` keyword, which transformers hands to every attention call, and the state attends
over its local context and memory (``stream.py``).

Every argument transformers passes is honoured or refused: ``scaling``, ``dropout``,
``sliding_window`` (a limit on the local context), ``softcap`` and ``s_aux`` (learned sinks) reach the
attention; bookkeeping arguments that do not change the math are ignored; any other raises.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

#: implementations a session can run its layers without memory on, and whether they take a mask
STREAMABLE = {"eager": True, "sdpa": True, "flash_attention_2": False, "flash_attention_3": False,
              "flash_attention_4": False,
              "memlm_s2": False,  # LongLoRA's S2-Attn (implementations.py): one whole segment per forward, causal
              "memlm_dilated": False,  # LongNet: patterns cut by index in the local context (XL cache + segment)
              "memlm_ring": False}  # Ring Attention: one device's segments (it refuses caches and unsharded positions)
#: arguments some models pass that do not change what attention computes
BOOKKEEPING = frozenset({"position_ids", "use_cache", "output_attentions", "output_hidden_states",
                         "output_router_logits", "return_dict", "cache_position", "is_causal",
                         "num_items_in_batch", "shift_labels"})  # loss arguments a causal LM passes down too


def attention_name(previous: str) -> str:
    """The name memlm registers for a model whose attention implementation was ``previous``."""
    return "memlm" if previous == "sdpa" else f"memlm_{previous}"


def previous_function(module: torch.nn.Module, previous: str) -> Callable:
    """The attention function ``previous`` names, for the attention module ``module``: transformers' registered
    one, or, for ``"eager"``, the ``eager_attention_forward`` of the model's own modeling file."""
    if previous != "eager":
        return ALL_ATTENTION_FUNCTIONS[previous]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward beside it in "
                         f"{type(module).__module__}; attach it with attn_implementation='sdpa'")
    return eager


def memlm_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    memlm_state=None,
    *,
    previous: str,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [batch, q_heads, n, d]; key, value [batch, kv_heads, n, d] -> ([batch, n, q_heads, d], weights)."""
    function = previous_function(module, previous)
    if memlm_state is None:
        return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = getattr(module, "layer_idx", None)
    if layer is None:
        raise ValueError(f"{type(module).__name__} has no layer_idx; memlm needs it to find each layer's memory")
    honoured = {name: kwargs.pop(name) for name in ("sliding_window", "softcap", "s_aux") if name in kwargs}
    unknown = sorted(set(kwargs) - BOOKKEEPING)
    if unknown:
        raise ValueError(f"{type(module).__name__} passes attention arguments memlm does not know: {unknown}; "
                         "memlm honours scaling, dropout, sliding_window, softcap and s_aux (sinks)")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = memlm_state.attend(module, layer, query, key, value, scale=scale, dropout=dropout,
                             sliding_window=honoured.get("sliding_window"), softcap=honoured.get("softcap"),
                             sinks=honoured.get("s_aux"))
    return out, None


def register(previous: str) -> str:
    """Make ``attn_implementation=attention_name(previous)`` available (idempotent); returns the name."""
    if previous not in STREAMABLE:
        raise ValueError(f"memlm streams models whose attention implementation is one of {sorted(STREAMABLE)}, "
                         f"got {previous!r}; load the model with attn_implementation='sdpa'")
    name = attention_name(previous)
    AttentionInterface.register(name, functools.partial(memlm_attention, previous=previous))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[previous])
    return name
