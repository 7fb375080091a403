"""Full-sequence attention implementations a user selects on any supported model: ``use_attention``.

``use_attention(model, "lambda")`` makes every attention layer of ``model`` run LM-Infinite's Λ attention (Han et
al. 2023; ``memlm.kernels.lambda_attention``) with the paper's setting: each query sees the first 10 tokens and
the ``local_window`` = L tokens up to itself (L the model's pretraining length), and a pair farther apart than
``distance_cap`` = L scores as if it were exactly that far (the query rotated to the cap, the key to position 0,
with the model's rotary frequencies of that forward); ``global_tokens``, ``local_window`` and ``distance_cap`` set
them otherwise. Whole sequences (evaluation, training) and decoding with a cache (``generate``: the reference's
cached mode, one query at a time over the kept keys) alike. ``use_attention(model, None)`` restores the
implementation the model had before.

``use_attention(model, "s2", group_size_ratio=0.25)`` (or ``group_size=G``) makes the model's attention LongLoRA's
shifted sparse attention (Chen et al. 2023; ``memlm.kernels.shifted_sparse_attention``) while it trains; in eval
mode (``model.eval()``) it is full causal attention, the model's previous implementation, as the paper infers.

``use_attention(model, "dilated", segment_lengths=(2048, 4096), dilation_rates=(1, 2))`` makes it LongNet's dilated
attention (Ding et al. 2023; ``memlm.kernels.dilated_attention``), in training, evaluation and generation alike;
with ``group=`` (a ``torch.distributed`` process group, e.g. under ``torchrun``) every rank runs the model on its
contiguous shard of each sequence, with global ``position_ids``, and the long patterns gather their dilated keys.

``use_attention(model, "ring", group=g)`` makes it Ring Attention (Liu et al. 2023; ``memlm.kernels.ring_attention``):
every rank of ``g`` runs the model on its zigzag shard of each sequence (``ring_shard_inputs`` cuts ``input_ids``,
global ``position_ids`` and the shifted labels), and attention is exact full causal attention over all the shards.

The function registered with transformers' ``AttentionInterface`` finds its settings by the attention module
it is called for, so models with different settings coexist. Its mask function is flash attention's (None
for an unpadded batch, else [b, n]): the kernels make their own patterns, and no n x n mask is built in training.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from memlm.config import check_integer
from memlm.kernels import dilated_attention, lambda_attention, ring_attention, ring_shard, shifted_sparse_attention
from memlm.kernels.dilated_attention import check_patterns
from memlm.kernels.ring_attention import LAYOUTS, check_same_shapes, ring_group
from memlm.positions.rotary import find_rotary, rotate
from memlm.positions.scaling import trained_length

from .attention import BOOKKEEPING, previous_function

#: LM-Infinite's local window and distance cap default to the length the model was pretrained on
PRETRAINED = "pretrained"


@dataclass(frozen=True)
class LambdaAttention:
    """LM-Infinite's settings: the global branch, the local window and the distance cap (None: no cap).

    The paper's setting is the default: 10 global tokens, and window and cap both the model's pretraining length
    (``"pretrained"``: its config's trained length, the one ``extend_context`` records, else
    ``max_position_embeddings``; the cap at least the window). Models without rotary positions get no cap."""

    global_tokens: int = 10
    local_window: int | str = PRETRAINED
    distance_cap: int | str | None = PRETRAINED

    def __post_init__(self) -> None:
        check_integer("global_tokens", self.global_tokens, 0)
        if self.local_window != PRETRAINED:
            check_integer("local_window", self.local_window, 1)
        if self.distance_cap not in (None, PRETRAINED):
            check_integer("distance_cap", self.distance_cap, 1)
            if self.local_window != PRETRAINED and self.distance_cap < self.local_window:
                raise ValueError(f"distance_cap ({self.distance_cap}) must be >= local_window ({self.local_window}): "
                                 "LM-Infinite caps only distances beyond the window")

    def for_model(self, model: PreTrainedModel, rotary: torch.nn.Module | None) -> LambdaAttention:
        """These settings with ``"pretrained"`` replaced by the model's pretraining length."""
        pretrained = trained_length(model.config)
        window = pretrained if self.local_window == PRETRAINED else self.local_window
        cap = self.distance_cap
        if cap == PRETRAINED:
            cap = None if rotary is None else max(pretrained, window)
        return replace(self, local_window=window, distance_cap=cap)


@dataclass(frozen=True)
class ShiftedSparseAttention:
    """LongLoRA's S2-Attn settings: groups of ``group_size`` tokens, or of ``int(n x group_size_ratio)`` tokens of
    each sequence of n (the paper's 1/4; the official code's rule), at least 2."""

    group_size_ratio: float | None = 0.25
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None:
            object.__setattr__(self, "group_size_ratio", None)
            check_integer("group_size", self.group_size, 2)
        elif not (isinstance(self.group_size_ratio, (int, float)) and 0 < self.group_size_ratio <= 1):
            raise ValueError(f"group_size_ratio must be a number in (0, 1], got {self.group_size_ratio!r}")

    def size(self, n: int) -> int:
        if self.group_size is not None:
            return self.group_size
        return max(2, int(n * self.group_size_ratio))


@dataclass(frozen=True)
class DilatedAttention:
    """LongNet's patterns: segment lengths w and dilation rates r, one (w, r) per pattern (geometric sequences such as
    w = 2048, 4096, 8192 with r = 1, 2, 4 are the paper's; any positive integers work). ``group``: None, or the
    process group whose ranks each hold a contiguous shard of the sequence."""

    segment_lengths: tuple[int, ...] = (2048, 4096, 8192)
    dilation_rates: tuple[int, ...] = (1, 2, 4)
    group: object | None = None

    def __post_init__(self) -> None:
        lengths, rates = check_patterns(self.segment_lengths, self.dilation_rates)
        object.__setattr__(self, "segment_lengths", lengths)
        object.__setattr__(self, "dilation_rates", rates)
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise ValueError(f"group must be a torch.distributed ProcessGroup or None, got {type(self.group).__name__}")


@dataclass(frozen=True)
class RingAttention:
    """Ring Attention's settings: the process group whose ranks each hold a shard of every sequence (None: the whole
    world, resolved at each call) and the shards' layout (``"zigzag"``, balanced under the causal mask, or
    ``"contiguous"``)."""

    group: object | None = None
    layout: str = "zigzag"

    def __post_init__(self) -> None:
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise ValueError(f"group must be a torch.distributed ProcessGroup or None, got {type(self.group).__name__}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")


#: attention module -> (settings, the model's rotary module or None, the previous implementation)
_SETTINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: model -> the attention implementation it had before use_attention
_PREVIOUS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_attention(model: PreTrainedModel, name: str | None, **options) -> PreTrainedModel:
    """Select memlm's attention implementation ``name`` (``"lambda"``, ``"s2"``, ``"dilated"``, ``"ring"``) with
    ``options`` on ``model``, or restore the model's previous one (``name=None``). Returns the model."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"use_attention expects a transformers PreTrainedModel, got {type(model).__name__}")
    current = model.config._attn_implementation or "eager"
    if name is None:
        if options:
            raise ValueError(f"use_attention(model, None) restores the previous attention and takes no options, got "
                             f"{sorted(options)}")
        if model in _PREVIOUS:
            model.set_attn_implementation(_PREVIOUS.pop(model))
        return model
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {name!r}; memlm has {sorted(IMPLEMENTATIONS)} (or None)")
    if current.startswith("memlm") and current not in NAMES.values():
        raise ValueError(f"this model runs memlm's streaming attention ({current!r}): detach it from memlm first")
    try:
        settings = IMPLEMENTATIONS[name][0](**options)
    except TypeError as error:
        raise ValueError(f"use_attention({name!r}) options: {error}") from error
    rotary = find_rotary(model)
    if isinstance(settings, LambdaAttention):
        settings = settings.for_model(model, rotary)
    if getattr(settings, "distance_cap", None) is not None and rotary is None:
        raise ValueError(f"distance_cap re-rotates keys and needs a rotary model; {type(model).__name__} has none")
    modules = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)
               and any(p.endswith("_proj") for p, _ in m.named_children())]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no attention modules with a layer_idx that memlm can find")
    _PREVIOUS.setdefault(model, current)
    for module in modules:
        _SETTINGS[module] = (settings, rotary, _PREVIOUS[model])
    registered = NAMES[name]
    AttentionInterface.register(registered, IMPLEMENTATIONS[name][1])
    AttentionMaskInterface.register(registered, ALL_MASK_ATTENTION_FUNCTIONS["flash_attention_2"])
    model.set_attn_implementation(registered)
    return model


def attention_settings(model: torch.nn.Module) -> object | None:
    """The settings ``use_attention`` gave ``model``'s attention modules (one object for all of them), or None."""
    return next((_SETTINGS[m][0] for m in model.modules() if m in _SETTINGS), None)


def settings_of(module: torch.nn.Module) -> tuple:
    if module not in _SETTINGS:
        raise ValueError(f"{type(module).__name__} was not set up by memlm.use_attention")
    return _SETTINGS[module]


def check_kwargs(name: str, kwargs: dict) -> None:
    unknown = sorted(key for key, value in kwargs.items() if key not in BOOKKEEPING and value is not None)
    if unknown:
        raise ValueError(f"{name} takes no {unknown} (sliding windows, softcaps and learned sinks are other "
                         "attention patterns)")


def lambda_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                   position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, hq, n, d]; key, value [b, hkv, m, d] (rotated to their positions; m > n when decoding with a cache:
    the queries are the last n) -> ([b, n, hq, d], None)."""
    settings, rotary, _ = settings_of(module)
    check_kwargs("Λ attention", kwargs)
    if dropout:
        raise ValueError("Λ attention has no attention dropout: set the model's attention_dropout to 0")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("Λ attention takes unpadded batches (no attention_mask with zeros)")
    n, m, cap = query.shape[2], key.shape[2], settings.distance_cap
    capped = {}
    if cap is not None and m > cap:
        if position_ids is None:
            raise ValueError("distance_cap needs the position ids the model rotated q and k with")
        positions = position_ids.to(query.device).expand(query.shape[0], n)
        steps = positions[:, 1:] - positions[:, :-1]
        if not bool((steps == 1).all()):
            raise ValueError("distance_cap needs consecutive position ids (distances are index distances)")
        first = min(settings.global_tokens, m)
        inv_freq = rotary.inv_freq  # read now: q and k were rotated with the frequencies of this forward
        key_positions = positions[:, :1] - (m - n) + torch.arange(first, device=query.device)  # the cached keys' own
        capped = {"distance_cap": cap,
                  "capped_q": rotate(query, (cap - positions)[:, None, :], inv_freq),
                  "capped_k": rotate(key[:, :, :first], -key_positions[:, None, :], inv_freq)}
    out = lambda_attention(query, key, value, global_tokens=settings.global_tokens,
                           local_window=settings.local_window, scale=scaling, **capped)
    return out.transpose(1, 2), None


def s2_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
               **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, hq, n, d]; key, value [b, hkv, n, d] -> ([b, n, hq, d], None): S2-Attn in training, the previous
    implementation (full causal attention) in eval mode. attention_mask: None or [b, keys] (1 = real token)."""
    settings, _, previous = settings_of(module)
    if not module.training:
        # full attention with the previous implementation; the mask function is flash attention's, so rebuild
        # the boolean [b, 1, q, k] mask the eager and SDPA paths take (causal, bottom-right aligned, padding)
        n, keys = query.shape[2], key.shape[2]
        mask = None
        if attention_mask is not None or (n > 1 and (keys > n or previous == "eager")):
            causal = torch.ones(n, keys, dtype=torch.bool, device=query.device).tril(keys - n)
            padding = (torch.ones(query.shape[0], keys, dtype=torch.bool, device=query.device)
                       if attention_mask is None else attention_mask[:, -keys:].bool())
            mask = causal[None, None] & padding[:, None, None, :]
            if previous == "eager":  # eager attention adds its mask to the scores: the dtype's minimum, as
                # transformers' own masks (-inf would turn fully padded rows into NaN that spread to later layers)
                mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                    ~mask, torch.finfo(query.dtype).min)
        function = previous_function(module, previous)
        return function(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    check_kwargs("S2-Attn", kwargs)
    if dropout:
        raise ValueError("S2-Attn has no attention dropout: set the model's attention_dropout to 0")
    if query.shape[2] != key.shape[2]:
        raise ValueError("S2-Attn trains full sequences: no cache (use_cache=False) in training mode")
    padding = None if attention_mask is None else attention_mask[:, -key.shape[2]:].bool()
    out = shifted_sparse_attention(query, key, value, settings.size(query.shape[2]), scale=scaling,
                                   key_padding_mask=padding)
    return out.transpose(1, 2), None


def dilated_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, hq, nq, d]; key, value [b, hkv, n, d] (nq < n with a cache) -> ([b, nq, hq, d], None)."""
    settings, _, _ = settings_of(module)
    check_kwargs("dilated attention", kwargs)
    if dropout:
        raise ValueError("dilated attention has no attention dropout: set the model's attention_dropout to 0")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("dilated attention takes unpadded batches (no attention_mask with zeros): its patterns are "
                         "cut by token index")
    out = dilated_attention(query, key, value, settings.segment_lengths, settings.dilation_rates, scale=scaling,
                            group=settings.group)
    return out.transpose(1, 2), None


def ring_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                 position_ids: torch.Tensor | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query [b, hq, n_local, d]; key, value [b, hkv, n_local, d], this rank's shard -> ([b, n_local, hq, d], None)."""
    settings, _, _ = settings_of(module)
    check_kwargs("ring attention", kwargs)
    if dropout:
        raise ValueError("ring attention has no attention dropout: set the model's attention_dropout to 0")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("ring attention takes unpadded batches (no attention_mask with zeros)")
    if query.shape[2] != key.shape[2]:
        raise ValueError(f"ring attention runs whole sharded sequences ({query.shape[2]} queries, {key.shape[2]} keys "
                         "with a cache): call the model with use_cache=False; it does not decode")
    if module.layer_idx == 0:  # once per forward: every layer gets the same shards and positions
        check_ring_inputs(query, key, position_ids, settings)
    return ring_attention(query, key, value, group=settings.group, scale=scaling, layout=settings.layout,
                          check_shapes=False).transpose(1, 2), None


def check_ring_inputs(query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor | None,
                      settings: RingAttention) -> None:
    """Every rank's shards have one shape and dtype, and the rotary positions are this rank's shard of the
    sequence's consecutive global positions; checked on all ranks together, in one collective (one rank raising
    alone would leave the others waiting in the ring)."""
    group = ring_group(settings.group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = True
    if position_ids is not None:
        n_local = query.shape[2]
        expected = ring_shard(torch.arange(n_local * world, device=position_ids.device), 0, rank, world,
                              settings.layout)
        mine = bool((position_ids - position_ids[..., :1] == expected - expected[0]).all())
    wrong = [r for r, flag in enumerate(check_same_shapes(query, key, group, mine)) if not flag]
    if wrong:
        raise ValueError(f"ring attention needs each token's global position: ranks {wrong} of {world} were given "
                         f"position_ids that are not their {settings.layout} shard of the sequence's positions (shard "
                         "the inputs with memlm.ring_shard_inputs); a memory session's segments cannot run on it")


def ring_shard_inputs(input_ids: torch.Tensor, labels: torch.Tensor | None = None, *, group=None,
                      layout: str = "zigzag") -> dict:
    """This rank's model inputs for ring attention: keyword arguments for a causal LM's forward.

    input_ids, labels: [b, n] of the whole sequences (labels as transformers takes them: the model shifts them; -100 =
    ignored), n a multiple of 2 x the group's size (zigzag). Returns ``input_ids`` and ``position_ids`` [b, n_local]
    and, with labels, the already shifted ``labels`` / ``shift_labels`` of the shard and ``num_items_in_batch`` (the
    scored tokens of all ranks): each rank's loss is then its share, the shares sum over the group to the unsharded
    loss, and the parameter gradients summed over the group are the unsharded ones.
    """
    group = ring_group(group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, tokens], got {getattr(input_ids, 'shape', input_ids)!r}")
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    inputs = {"input_ids": ring_shard(input_ids, 1, rank, world, layout),
              "position_ids": ring_shard(positions, 1, rank, world, layout)}
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {list(input_ids.shape)}, got "
                             f"{getattr(labels, 'shape', labels)!r}")
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)  # token i predicts label i + 1
        count = (shifted != -100).sum()
        inputs["labels"] = inputs["shift_labels"] = ring_shard(shifted, 1, rank, world, layout)
        inputs["num_items_in_batch"] = count
    return inputs


IMPLEMENTATIONS = {"lambda": (LambdaAttention, lambda_forward), "s2": (ShiftedSparseAttention, s2_forward),
                   "dilated": (DilatedAttention, dilated_forward), "ring": (RingAttention, ring_forward)}
#: the names registered with transformers' AttentionInterface
NAMES = {"lambda": "memlm_lambda", "s2": "memlm_s2", "dilated": "memlm_dilated", "ring": "memlm_ring"}
