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

from .rotary import find_rotary, rotary_modules

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
    original_max_position_embeddings: the trained length L (default: what the config says it is); recorded in the
        config (``config.original_max_position_embeddings``), so a model extended again extends from L.
    parameters: the method's own (``PARAMETERS``): ``rope_theta`` (abf); ``beta_fast``, ``beta_slow``,
        ``attention_factor`` (yarn); ``low_freq_factor``, ``high_freq_factor`` (llama3); ``short_factor``,
        ``long_factor`` (longrope); ``truncate``, ``power`` (giraffe).
    ``config.max_position_embeddings`` becomes L x factor, except for ``dynamic``, whose formula reads it as L.

    An extended model (by memlm, or one that ships scaled, such as Llama 3.1's ``llama3`` rope) extended again
    composes: the same method multiplies the factors (yarn x2 on yarn x4 over L is yarn x8 over L); ``abf`` and
    ``ntk`` change the base under the rule already there; another rule would silently replace the model's own
    and is refused.
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
    current = dict(config.rope_parameters)
    rule = current.get("rope_type", "default")
    if rule == method and method not in ("abf", "ntk", "longrope"):  # extended again: the other parameters stay
        parameters = {**{key: value for key, value in current.items() if key in allowed}, **parameters}
    missing = [name for name in required if parameters.get(name) is None]
    if missing:
        raise ValueError(f"{method}: missing parameters {missing} (it needs {', '.join(required)})")
    if factor is None and method != "abf":
        raise ValueError(f"{method}: factor (the extension L'/L) is required")
    if factor is not None and (not _number(factor) or factor <= 0):
        raise ValueError(f"factor must be a number > 0, got {factor!r}")
    trained = trained_length(config)
    if original_max_position_embeddings is not None:
        if not isinstance(original_max_position_embeddings, int) or original_max_position_embeddings < 1:
            raise ValueError("original_max_position_embeddings must be a positive integer, got "
                             f"{original_max_position_embeddings!r}")
        if is_extended(config) and original_max_position_embeddings != trained:
            raise ValueError(f"this model was trained on {trained} tokens (its rope parameters say so, or its first "
                             f"extension recorded it); original_max_position_embeddings="
                             f"{original_max_position_embeddings} contradicts that")
        trained = original_max_position_embeddings
    extended = config.max_position_embeddings if is_extended(config) else trained
    rope = dict(current) if method in ("abf", "ntk") else \
        {key: current[key] for key in ("rope_theta", "partial_rotary_factor") if key in current}
    rope.setdefault("rope_theta", 10000.0)
    if method in ("abf", "ntk"):  # a new base: the rule already there (if any) applies on top of it
        theta = parameters["rope_theta"] if method == "abf" else \
            rope["rope_theta"] * factor ** (rotary_dim(config) / (rotary_dim(config) - 2))
        if not _number(theta) or theta <= 0:
            raise ValueError(f"abf: rope_theta must be a number > 0, got {theta!r}")
        rope["rope_theta"] = float(theta)
        length = round(extended * factor) if factor is not None else extended
    else:
        if rule not in ("default", method) or method == rule == "longrope":
            raise ValueError(
                f"this model's rotary embedding already scales with {rule!r} (factor {current.get('factor')} over "
                f"{trained} trained tokens); {method!r} would replace that rule, not extend it: extend with "
                f"method={rule!r} (the factors multiply) or 'abf' / 'ntk' (a new base under the same rule)"
                + (", or give longrope's combined factors on the model as loaded" if rule == "longrope" else ""))
        if rule == method:  # an extended model extended again: the factors multiply
            factor = factor * current["factor"]
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
        length = trained if method == "dynamic" else round(trained * factor)
    config.rope_parameters = rope
    config.max_position_embeddings = length
    config.original_max_position_embeddings = trained  # so the next extension starts from the trained length
    if method != "giraffe":  # transformers' own checks (they warn rather than raise on odd values)
        config.validate_rope()
    _rebuild(model, config)
    return model


def trained_length(config) -> int:
    """The length the model was trained on: recorded by its first extension, else its rope parameters'
    ``original_max_position_embeddings`` (a model that ships scaled, such as Llama 3.1), else its window."""
    return (getattr(config, "original_max_position_embeddings", None)
            or (getattr(config, "rope_parameters", None) or {}).get("original_max_position_embeddings")
            or config.max_position_embeddings)


def is_extended(config) -> bool:
    """Whether the model's window is already an extension of its trained length (by memlm or as it ships)."""
    return (getattr(config, "original_max_position_embeddings", None) is not None
            or config.rope_parameters.get("rope_type", "default") != "default")


def extend_from_spec(model: nn.Module, spec: dict) -> nn.Module:
    """``extend_context`` from a recipe's or an eval mode's ``{"method": ..., "factor": ..., ...}``."""
    if not isinstance(spec, dict) or "method" not in spec:
        raise ValueError(f"extend needs a method (one of {', '.join(METHODS)}), got {spec!r}")
    parameters = dict(spec)
    return extend_context(model, parameters.pop("method"), **parameters)


def _rebuild(model: nn.Module, config) -> None:
    """Rebuild every rotary module of the model from ``config``, in place: the same module objects stay in the model,
    so whatever holds one (a ``SinkCache``, ``use_attention``'s distance cap, a session's position policy) rotates
    with the new frequencies from its next use."""
    for rotary in rotary_modules(model):
        fresh = type(rotary)(config=config).to(rotary.inv_freq.device)
        state = {name: value for name, value in vars(fresh).items() if not name.startswith("_") and name != "training"}
        for name in [name for name in vars(rotary) if not name.startswith("_") and name not in vars(fresh)]:
            delattr(rotary, name)  # what the previous rule cached (longrope's long_inv_freq)
        for name, value in state.items():
            setattr(rotary, name, value)
        persistent = fresh.state_dict(keep_vars=True)
        for name, buffer in fresh.named_buffers(recurse=False):
            rotary.register_buffer(name, buffer, persistent=name in persistent)


def _number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
