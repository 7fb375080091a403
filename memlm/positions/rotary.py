"""Moving keys between positions with the model's own rotary embedding.

memlm keeps keys *unrotated* (as if at position 0) in its Transformer-XL cache and kNN memory, and
rotates them to wherever they stand in the current local context. The angles come from the model's
rotary module (its ``inv_freq``, which already holds any PI/NTK/YaRN/Llama-3 frequency scaling);
the module's ``attention_scaling`` is *not* applied, because the keys the model produced already
carry it once (YaRN and LongRoPE fold it into cos/sin), and rotating by the angle alone moves a key
without scaling it again. The rotation follows transformers' ``rotate_half`` convention of the
Llama family (the first ``2 * len(inv_freq)`` channels rotate; any others pass through).
"""

from __future__ import annotations

import torch
from torch import nn


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """Every rotary-embedding module of the model (the modules with an ``inv_freq`` tensor): one in Llama-style
    models, one per attention layer in some older ones."""
    return [m for m in model.modules() if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module, or None. Hold the module, not its ``inv_freq``: transformers replaces
    that buffer (dynamic NTK as a sequence grows) and ``extend_context`` updates it; read it where it is used."""
    found = rotary_modules(model)
    if any(not torch.equal(found[0].inv_freq, m.inv_freq) for m in found[1:]):
        raise ValueError(
            f"{type(model).__name__} has {len(found)} rotary embeddings with different frequencies; "
            "memlm supports models with one (Llama, Mistral, Qwen2) or none (GPT-2)"
        )
    return found[0] if found else None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate(keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate keys by ``positions`` (which may be negative or fractional).

    keys: [..., head_dim]; positions: broadcastable to keys.shape[:-1]; inv_freq: [rot_dim / 2].
    Angles are computed in float64 (document positions reach millions, where float32 angles are off by
    hundredths of a radian), the rotation in float32 (float64 for float64 keys); returned in the keys' dtype.
    """
    compute = torch.float64 if keys.dtype == torch.float64 else torch.float32
    return apply_rotation(keys, *rotation(positions, inv_freq, keys.device, compute))


def rotation(positions: torch.Tensor, inv_freq: torch.Tensor, device: torch.device,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [*positions.shape, rot_dim] of the angles ``positions * inv_freq`` (computed in float64), in
    ``dtype`` on ``device``: a table ``apply_rotation`` can use for many keys."""
    where = torch.device("cpu") if device.type == "mps" else device  # MPS has no float64
    angles = positions.to(where, torch.float64).unsqueeze(-1) * inv_freq.to(where, torch.float64)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """keys [..., head_dim] rotated by the angles whose cos, sin [..., rot_dim] (broadcastable) are given, in their
    dtype; returned in the keys' dtype."""
    rot_dim = cos.shape[-1]
    x = keys.to(cos.dtype)
    rotated = x[..., :rot_dim] * cos + rotate_half(x[..., :rot_dim]) * sin
    if rot_dim < keys.shape[-1]:
        rotated = torch.cat((rotated, x[..., rot_dim:]), dim=-1)
    return rotated.to(keys.dtype)
