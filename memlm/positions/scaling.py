"""RoPE context extension in one call: ``extend_context(model, method, factor=..., **parameters)``.

The methods change the frequencies of the model's rotary embedding, so that positions beyond the trained
length ``L`` look like positions the model knows:

* ``linear``: Position Interpolation (Chen et al. 2023): positions x L/L', i.e. frequencies / factor.
* ``abf``: the adjusted base frequency of "Effective Long-Context Scaling" (Xiong et al. 2023):
  ``rope_theta`` 10,000 -> e.g. 500,000.
* ``ntk``: static NTK-aware scaling (bloc97 2023; Peng et al. 2023): base x factor ** (d / (d - 2)).
* ``dynamic``: transformers' dynamic NTK (the base grows with the current length).
* ``yarn``: YaRN (Peng et al. 2023): NTK-by-parts interpolation and an attention factor.
* ``llama3``, ``longrope``: Llama 3.1's and LongRoPE's (Ding et al. 2024) frequency rules.
* ``giraffe``: Giraffe's scaled, power and truncated bases (Pal et al. 2023), registered here as a
  transformers rope function (``ROPE_INIT_FUNCTIONS["giraffe"]``).

transformers 5 has all but ``ntk``, ``abf`` (both are a new ``rope_theta`` of the default rope) and
Giraffe as rope functions selected by ``config.rope_parameters``; ``extend_context`` writes that dict,
checks it, and rebuilds the model's rotary module from it (weights untouched). Streaming composes: the
runtime keeps keys unrotated and rotates them with the rotary module's current ``inv_freq`` (``policy.py``),
so every method's frequencies, and dynamic NTK's changing base, reach cached and stored keys; the
attention factor (YaRN, LongRoPE) is in the keys once, never applied again by a re-rotation. transformers'
own cache keeps keys rotated with the base of the step that made them (its issue #25104), so dynamic
NTK streamed by memlm in ``position_mode="absolute"`` equals a full forward at the final length, which
transformers' cache does not.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .rotary import find_rotary

METHODS = ("linear", "abf", "ntk", "dynamic", "yarn", "llama3", "longrope", "giraffe")
#: parameters each method takes besides ``factor`` (required ones first) and the ones it must have
PARAMETERS = {
    "linear": ((), ()),
    "abf": (("rope_theta",), ("rope_theta",)),
    "ntk": ((), ()),
    "dynamic": ((), ()),
    "yarn": (("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate"), ()),
    "llama3": (("low_freq_factor", "high_freq_factor"), ("low_freq_factor", "high_freq_factor")),
    "longrope": (("short_factor", "long_factor", "attention_factor"), ("short_factor", "long_factor")),
    "giraffe": (("truncate", "power"), ()),
}


def giraffe_frequencies(config, device=None, seq_len=None, layer_type=None) -> tuple[torch.Tensor, float]:
    """Giraffe's basis (Pal et al. 2023) as a transformers rope function: the default frequencies
    ``base ** (-2i / d)`` divided by ``factor``, multiplied by ``(1 - i / (d/2)) ** power`` when ``power`` > 0,
    then, with ``truncate`` = L_t, cut at ``b = 2 pi / L_t``: below ``b / 8`` -> 0, in ``[b / 8, b)`` -> ``b / 16``,
    the rest kept. Returns (inv_freq [d / 2], attention factor 1)."""
    parameters = config.rope_parameters
    check_giraffe(parameters)
    dim = rotary_dim(config)
    i = torch.arange(0, dim // 2, dtype=torch.float64, device=device)
    inv_freq = parameters["rope_theta"] ** (-2 * i / dim) / parameters["factor"]
    if parameters.get("power"):
        inv_freq = inv_freq * (1 - i / (dim // 2)) ** parameters["power"]
    if parameters.get("truncate"):
        cutoff = 2 * math.pi / parameters["truncate"]
        inv_freq = torch.where(inv_freq < cutoff / 8, torch.zeros_like(inv_freq),
                               torch.where(inv_freq < cutoff, torch.full_like(inv_freq, cutoff / 16), inv_freq))
    return inv_freq.float(), 1.0


def check_giraffe(parameters: dict) -> None:
    """Giraffe's validation: factor > 1 (or 1 with a truncation or power), truncate and power >= 0."""
    factor, truncate, power = parameters.get("factor"), parameters.get("truncate"), parameters.get("power")
    if not _number(factor) or factor < 1:
        raise ValueError(f"giraffe: factor must be a number >= 1, got {factor!r}")
    if truncate is not None and (not _number(truncate) or truncate <= 0):
        raise ValueError(f"giraffe: truncate (L_t, in tokens) must be a number > 0, got {truncate!r}")
    if power is not None and (not _number(power) or power < 0):
        raise ValueError(f"giraffe: power must be a number >= 0, got {power!r}")


def register_giraffe() -> None:
    """Make ``rope_type="giraffe"`` known to transformers (idempotent); a saved Giraffe model needs this before
    ``from_pretrained``."""
    ROPE_INIT_FUNCTIONS.setdefault("giraffe", giraffe_frequencies)


def rotary_dim(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * config.rope_parameters.get("partial_rotary_factor", 1.0))


def extend_context(model: nn.Module, method: str, factor: float | None = None, *,
                   original_max_position_embeddings: int | None = None, **parameters) -> nn.Module:
    """Extend a rotary model's context with ``method``; returns the same model with its rotary module rebuilt.

    factor: the extension L'/L (required, except for ``abf``, where it only raises ``max_position_embeddings``).
    original_max_position_embeddings: the trained length L (default: what the config says it is).
    parameters: the method's own (``PARAMETERS``): ``rope_theta`` (abf); ``beta_fast``, ``beta_slow``,
        ``attention_factor`` (yarn); ``low_freq_factor``, ``high_freq_factor`` (llama3); ``short_factor``,
        ``long_factor`` (longrope); ``truncate``, ``power`` (giraffe).
    ``config.max_position_embeddings`` becomes L x factor, except for ``dynamic``, whose formula reads it as L.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")
    if hasattr(model, "memlm_memory"):
        raise ValueError("extend_context before attach (the memory model keeps the rotary module): detach() first")
    rotary = find_rotary(model)
    config = getattr(model, "config", None)
    if rotary is None or config is None or not getattr(config, "rope_parameters", None):
        raise ValueError(f"{type(model).__name__} has no rotary position embedding to extend (absolute positions, "
                         "such as GPT-2's, cannot be scaled)")
    allowed, required = PARAMETERS[method]
    unknown = sorted(set(parameters) - set(allowed))
    if unknown:
        raise ValueError(f"{method}: unknown parameters {unknown}; {method} takes "
                         f"{', '.join(('factor', *allowed))}")
    missing = [name for name in required if parameters.get(name) is None]
    if missing:
        raise ValueError(f"{method}: missing parameters {missing} (it needs {', '.join(required)})")
    if factor is None and method != "abf":
        raise ValueError(f"{method}: factor (the extension L'/L) is required")
    if factor is not None and (not _number(factor) or factor <= 0):
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    current = dict(config.rope_parameters)
    trained = original_max_position_embeddings or current.get("original_max_position_embeddings") or \
        config.max_position_embeddings
    if not isinstance(trained, int) or trained < 1:
        raise ValueError(f"original_max_position_embeddings must be a positive integer, got {trained!r}")
    base = current.get("rope_theta", 10000.0)
    rope = {"rope_theta": base, **({"partial_rotary_factor": current["partial_rotary_factor"]}
                                   if "partial_rotary_factor" in current else {})}
    if method in ("abf", "ntk"):
        theta = parameters["rope_theta"] if method == "abf" else None
        if method == "ntk":
            dim = rotary_dim(config)
            theta = base * factor ** (dim / (dim - 2))
        if not _number(theta) or theta <= 0:
            raise ValueError(f"abf: rope_theta must be a number > 0, got {theta!r}")
        rope.update(rope_type="default", rope_theta=float(theta))
    else:
        rope.update(rope_type=method, factor=float(factor), **parameters)
        if method in ("yarn", "llama3", "longrope"):
            rope["original_max_position_embeddings"] = trained
        if method == "giraffe":
            check_giraffe(rope)
            register_giraffe()
        if method == "longrope":
            half = rotary_dim(config) // 2
            for name in ("short_factor", "long_factor"):
                if not isinstance(rope[name], (list, tuple)) or len(rope[name]) != half:
                    raise ValueError(f"longrope: {name} must be a list of {half} numbers (one per frequency)")
                rope[name] = [float(v) for v in rope[name]]
    config.rope_parameters = rope
    if method != "dynamic" and factor is not None:
        config.max_position_embeddings = round(trained * factor)
    elif method == "dynamic":
        config.max_position_embeddings = trained
    if method != "giraffe":  # transformers' own checks (they warn rather than raise on odd values)
        config.validate_rope()
    _rebuild(model, rotary, config)
    return model


def extend_from_spec(model: nn.Module, spec: dict) -> nn.Module:
    """``extend_context`` from a recipe's or an eval mode's ``{"method": ..., "factor": ..., ...}``."""
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"extend needs a method (one of {', '.join(METHODS)}), got {spec!r}")
    parameters = dict(spec)
    return extend_context(model, parameters.pop("method"), **parameters)


def _rebuild(model: nn.Module, rotary: nn.Module, config) -> None:
    """Replace the rotary module by one built from ``config`` (same class, device and place in the model)."""
    device = rotary.inv_freq.device
    fresh = type(rotary)(config=config).to(device)
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is rotary:
                setattr(parent, name, fresh)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
