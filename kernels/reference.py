"""Memory attention in plain torch: the reference every faster kernel is checked against.

One segment's queries attend to their local context (Transformer-XL cache + the segment itself,
causally) and to memory entries, fused in one of two ways:

* ``fusion="gate"`` (Memorizing Transformers, Wu et al. 2022): two separate softmaxes, mixed per
  head by a learned gate: ``sigmoid(g) * memory_attention + (1 - sigmoid(g)) * local_attention``.
* ``fusion="joint"`` (Focused Transformer, Tworkowski et al. 2023): one softmax over local and memory
  keys together.

Memory comes in two layouts: *retrieved* (each query its own top-k entries, as a kNN search gives
them) and *shared* (one block of entries every query sees, as in Focused-Transformer training).
A query with no valid memory entry gets the local result alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FUSIONS = ("gate", "joint")


def memory_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mem_k: torch.Tensor | None = None,
    mem_v: torch.Tensor | None = None,
    mem_mask: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
    fusion: str = "gate",
    scale: float | None = None,
    causal: bool = True,
    upcast: bool = False,
) -> torch.Tensor:
    """Local attention fused with memory attention; see the module docstring.

    Args:
        q: [batch, q_heads, seq, head_dim] queries of the segment (positions applied).
        k, v: [batch, kv_heads, ctx, head_dim] local keys/values (cache + segment); q_heads must be a
            multiple of kv_heads (grouped-query attention: query head h reads kv head h // group).
        mem_k, mem_v: retrieved layout [batch, q_heads, seq, top_k, head_dim], or shared layout
            [batch, kv_heads, mem_len, head_dim]; None for no memory.
        mem_mask: bool, [batch, q_heads, seq, top_k] or [batch, kv_heads, mem_len]; False = absent.
        gate: [q_heads] gate logits, required by ``fusion="gate"`` when memory is given.
        fusion: ``"gate"`` or ``"joint"``.
        scale: softmax scale; default 1/sqrt(head_dim).
        causal: query i of the segment sees local keys 0 .. ctx - seq + i.
        upcast: compute in float32 and return in the input dtype.

    Retrieved memory is stop-gradient; shared memory (Focused-Transformer training) gets gradients.

    Returns:
        [batch, q_heads, seq, head_dim] in the dtype of ``q``.
    """
    check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal)
    dtype = q.dtype
    if mem_k is not None and mem_k.dim() == 5:  # retrieved memory comes from a kNN index: stop-gradient
        mem_k, mem_v = mem_k.detach(), mem_v.detach()
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
        mem_k, mem_v, gate = (None if t is None else t.float() for t in (mem_k, mem_v, gate))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    local = local_attention(q, k, v, scale, causal)
    if mem_k is None:
        return local.to(dtype)

    mem_scores, mem_valid = memory_scores(q, mem_k, mem_mask, scale)  # [b, hq, s, m], bool same
    mem_lse = mem_scores.logsumexp(dim=-1, keepdim=True)  # -inf where a query has no valid entry
    has_memory = mem_valid.any(dim=-1, keepdim=True)  # [b, hq, s, 1]
    probs = torch.where(has_memory, (mem_scores - mem_lse).exp(), 0.0)
    memory = memory_values(probs.to(mem_v.dtype), mem_v)  # [b, hq, s, d]

    if fusion == "gate":
        g = torch.sigmoid(gate).view(1, -1, 1, 1).to(local.dtype)
        out = torch.where(has_memory, g * memory + (1 - g) * local, local)
    else:
        local_lse = local_logsumexp(q, k, scale, causal)
        total = torch.logaddexp(local_lse, mem_lse)
        out = (local_lse - total).exp() * local + torch.where(has_memory, (mem_lse - total).exp(), 0.0) * memory
    return out.to(dtype)


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Causal (bottom-right aligned) attention of q over k, v via ``scaled_dot_product_attention``."""
    seq, ctx = q.shape[2], k.shape[2]
    mask = None
    if causal and ctx != seq:
        # An additive float mask: SDPA's CPU kernel takes its fast path with it, not with a bool mask (2x here).
        mask = torch.zeros(seq, ctx, dtype=q.dtype, device=q.device).masked_fill_(
            ~causal_mask(seq, ctx, q.device), -math.inf
        )
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and ctx == seq, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )


def causal_mask(seq: int, ctx: int, device: torch.device) -> torch.Tensor:
    """[seq, ctx] bool: query i sees keys 0 .. ctx - seq + i (the segment is the last ``seq`` keys)."""
    return torch.ones(seq, ctx, dtype=torch.bool, device=device).tril(diagonal=ctx - seq)


def local_logsumexp(q: torch.Tensor, k: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """[batch, q_heads, seq, 1] float32: log of the local softmax denominator (joint fusion needs it)."""
    scores = grouped(q, k.shape[1]) @ k.unsqueeze(2).transpose(-1, -2) * scale  # [b, hkv, g, s, ctx]
    scores = scores.flatten(1, 2).float()
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), -math.inf)
    return scores.logsumexp(dim=-1, keepdim=True)


def memory_scores(q, mem_k, mem_mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores and validity of every memory entry: [batch, q_heads, seq, mem] each."""
    if mem_k.dim() == 5:  # retrieved: [b, hq, s, top_k, d]
        scores = torch.einsum("bhsd,bhskd->bhsk", q, mem_k.to(q.dtype)) * scale
        valid = mem_mask if mem_mask is not None else torch.ones_like(scores, dtype=torch.bool)
    else:  # shared: [b, hkv, m, d]
        scores = (grouped(q, mem_k.shape[1]) @ mem_k.to(q.dtype).unsqueeze(2).transpose(-1, -2)).flatten(1, 2) * scale
        group = q.shape[1] // mem_k.shape[1]
        valid = mem_mask if mem_mask is not None else torch.ones(mem_k.shape[:3], dtype=torch.bool, device=q.device)
        valid = valid.repeat_interleave(group, dim=1).unsqueeze(2).expand_as(scores)
    return scores.masked_fill(~valid, -math.inf), valid


def memory_values(probs: torch.Tensor, mem_v: torch.Tensor) -> torch.Tensor:
    """probs [batch, q_heads, seq, mem] weighted sum of memory values -> [batch, q_heads, seq, head_dim]."""
    if mem_v.dim() == 5:
        return torch.einsum("bhsk,bhskd->bhsd", probs, mem_v)
    batch, q_heads, seq, mem = probs.shape
    kv_heads = mem_v.shape[1]
    out = probs.view(batch, kv_heads, q_heads // kv_heads, seq, mem) @ mem_v.unsqueeze(2)
    return out.flatten(1, 2)


def grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[batch, q_heads, seq, d] -> [batch, kv_heads, group, seq, d] (query head h reads kv head h // group)."""
    batch, q_heads, seq, dim = q.shape
    return q.view(batch, kv_heads, q_heads // kv_heads, seq, dim)


def check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal) -> None:
    """Raise a ValueError/TypeError that says what was expected when an argument does not fit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [batch, heads, seq, head_dim], got {_shape(t)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: all inputs must share one device")
    batch, q_heads, seq, dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != dim:
        raise ValueError(
            f"k and v must both be [batch={batch}, kv_heads, ctx, head_dim={dim}], got {_shape(k)} and {_shape(v)}"
        )
    kv_heads, ctx = k.shape[1], k.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads})")
    if causal and ctx < seq:
        raise ValueError(f"causal attention needs ctx >= seq (the segment ends the context), got {ctx} < {seq}")
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if (mem_k is None) != (mem_v is None):
        raise ValueError("mem_k and mem_v must be given together")
    if mem_k is None:
        return
    retrieved = (batch, q_heads, seq)
    if mem_k.dim() == 5 and tuple(mem_k.shape[:3]) == retrieved and mem_k.shape[4] == dim:
        mask_shape = tuple(mem_k.shape[:4])
    elif mem_k.dim() == 4 and tuple(mem_k.shape[:2]) == (batch, kv_heads) and mem_k.shape[3] == dim:
        mask_shape = tuple(mem_k.shape[:3])
    else:
        raise ValueError(
            f"mem_k must be [batch={batch}, q_heads={q_heads}, seq={seq}, top_k, head_dim={dim}] (retrieved) or "
            f"[batch={batch}, kv_heads={kv_heads}, mem_len, head_dim={dim}] (shared), got {_shape(mem_k)}"
        )
    if mem_v.shape != mem_k.shape:
        raise ValueError(f"mem_v must have mem_k's shape {_shape(mem_k)}, got {_shape(mem_v)}")
    for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
        if t.device != q.device or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor on {q.device}, got {t.dtype} on {t.device}")
    if mem_mask is not None and (mem_mask.dtype != torch.bool or tuple(mem_mask.shape) != mask_shape):
        raise ValueError(
            f"mem_mask must be a bool tensor of shape {list(mask_shape)}, got {mem_mask.dtype} {_shape(mem_mask)}"
        )
    if fusion == "gate" and (not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (q_heads,)):
        raise ValueError(f"fusion='gate' needs gate logits of shape [q_heads={q_heads}], got {_shape(gate)}")
    if fusion == "gate" and (gate.device != q.device or not gate.is_floating_point()):
        raise ValueError(f"gate must be a floating-point tensor on {q.device}, got {gate.dtype} on {gate.device}")


def _shape(t: object) -> str:
    return str(list(t.shape)) if isinstance(t, torch.Tensor) else repr(t)
