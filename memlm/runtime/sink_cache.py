"""``SinkCache``: attention sinks + a sliding window as a transformers 5 cache (StreamingLLM, Xiao et al. 2023).

For plain ``model.generate(..., cache=SinkCache(model, sink_tokens=4, window=1024))``: every layer keeps the
document's first ``sink_tokens`` keys/values and its last ``window`` ones, so memory stays bounded however long the
stream runs. Keys are kept unrotated (the model's own rotary frequencies, read at each step, undo the rotation when
they arrive) and re-rotated on use to *positions within the cache*, StreamingLLM's rule: the kept keys stand
contiguously right before the new tokens, so no distance ever exceeds sinks + window + new tokens, whatever position
ids the caller uses. (transformers 5 dropped its own ``SinkCache``.)

The layers are transformers' ``DynamicLayer`` with another ``update``: what the mask is built from
(``get_mask_sizes``) describes the kept keys as the ones right before the queries, all visible.
"""

from __future__ import annotations

import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import DynamicLayer

from memlm.config import check_integer
from memlm.positions.rotary import find_rotary, rotate


class SinkLayer(DynamicLayer):
    """One layer: unrotated keys, values [batch, kv_heads, kept, head_dim], kept <= sink_tokens + window."""

    is_croppable = False

    def __init__(self, sink_tokens: int, window: int, rotary: torch.nn.Module) -> None:
        super().__init__()
        self.sink_tokens, self.window, self.rotary = sink_tokens, window, rotary
        self.cumulative_length = 0  # tokens seen

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, kwargs: dict | None = None,
               **extra) -> tuple[torch.Tensor, torch.Tensor]:
        """New keys, values [batch, kv_heads, n, d] (keys rotated to the ``position_ids`` in ``kwargs``); returns the
        keys and values to attend to: the kept ones (re-rotated to stand right before the new) and the new."""
        position_ids = (kwargs or {}).get("position_ids", extra.get("position_ids"))
        if position_ids is None:
            raise ValueError("SinkCache needs the position ids the model rotated its keys with; this model does not "
                             "pass position_ids to its attention")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[3]))
            self.values = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[3]))
        batch, n = key_states.shape[0], key_states.shape[2]
        inv_freq = self.rotary.inv_freq  # what the model rotated these keys with (dynamic NTK changes it as it grows)
        positions = position_ids.to(key_states.device).expand(batch, n)
        kept = self.keys.shape[2]
        before = positions[:, :1] - kept + torch.arange(kept, device=key_states.device)  # [batch, kept]
        attended_k = torch.cat((rotate(self.keys, before[:, None, :], inv_freq), key_states), dim=2)
        attended_v = torch.cat((self.values, value_states), dim=2)
        keys = torch.cat((self.keys, rotate(key_states, -positions[:, None, :], inv_freq)), dim=2)
        values = attended_v
        if keys.shape[2] > self.sink_tokens + self.window:  # the sinks (the first tokens) and the last window
            keys, values = (torch.cat((t[:, :, : self.sink_tokens], t[:, :, -self.window :]), dim=2)
                            for t in (keys, values))
        self.keys, self.values = keys, values
        self.cumulative_length += n
        return attended_k, attended_v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset): the kept keys stand right before the queries (at offset seen - kept)."""
        kept = self.keys.shape[2] if self.is_initialized else 0
        return kept + query_length, self.cumulative_length - kept

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1  # a stream of any length

    def reset(self) -> None:
        super().reset()
        self.cumulative_length = 0


class SinkCache(Cache):
    """Attention sinks + sliding window for ``model.generate``; memory bounded by ``sink_tokens + window`` per layer."""

    def __init__(self, model: PreTrainedModel, sink_tokens: int = 4, window: int = 1024) -> None:
        check_integer("sink_tokens", sink_tokens, 0)
        check_integer("window", window, 1)
        rotary = find_rotary(model)
        if rotary is None:
            raise ValueError(f"SinkCache re-rotates keys and needs a rotary model; {type(model).__name__} has none")
        layers = model.config.get_text_config().num_hidden_layers
        super().__init__(layers=[SinkLayer(sink_tokens, window, rotary) for _ in range(layers)])
        self.sink_tokens, self.window = sink_tokens, window
