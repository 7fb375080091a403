"""Unlimiformer (Bertsch et al. 2023): an encoder-decoder model reads an input of any length.

The input is encoded in overlapping windows of the encoder's length; of every window only the
middle half is kept (the first window keeps its start, the last its end), so every token is encoded
with context on both sides. The final encoder states h_j [hidden] of the whole input go into one
``memlm.index``. From decoder layer ``layer_begin`` on, every cross-attention head retrieves, for
every decoder query, the top-k states by its own attention score: with W_k,h the head's rows of the
key projection, q_h . (W_k,h h_j + b) = (W_k,h^T q_h) . h_j + const, so one index of states serves
every head of every layer. Keys and values of the retrieved states are then made by that layer's
own projections, and the head attends to them. Nothing holds a layer's keys/values for the whole
input. Layers below ``layer_begin`` attend to the first window, as the plain model would.

The model's attention implementation is switched to ``"memlm_unlimiformer"`` only inside
``Unlimiformer``'s calls, which hand their state to the attention function as a forward keyword;
outside them the model is untouched. Supported: encoder-decoder models whose attention goes through
transformers' AttentionInterface (BART, mBART, Pegasus, T5, ...) with cross-attention modules
``encoder_attn``/``EncDecAttention`` and ``k_proj``/``v_proj`` or ``k``/``v`` projections. LED has the
right modules but, in transformers 5, its own attention code, so it is refused rather than run plain.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AttentionInterface, EncoderDecoderCache, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from memlm.config import check_integer
from memlm.index import create_index

ATTENTION_NAME = "memlm_unlimiformer"
CROSS_ATTENTION_NAMES = ("encoder_attn", "EncDecAttention")
PROJECTIONS = (("k_proj", "v_proj"), ("k", "v"))
SUPPORTED = ("encoder-decoder models whose attention goes through transformers' AttentionInterface, with "
             "encoder_attn / EncDecAttention cross-attention: BART, mBART, Pegasus, T5, ... "
             "(not LED in transformers 5)")


@dataclass
class UnlimiformerConfig:
    """How the long input is encoded and retrieved; validated in ``__post_init__``."""

    top_k: int = 32  # encoder states each cross-attention head retrieves per decoder query
    layer_begin: int = 0  # decoder layers from here on retrieve; earlier ones attend to the first window
    window: int | None = None  # encoder window in tokens; default: the model's max positions, else 512
    index: str = "torch"
    index_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, low in (("top_k", 1), ("layer_begin", 0)):
            check_integer(name, getattr(self, name), low)
        check_integer("window", self.window, 4, optional=True)


def encoder_windows(length: int, window: int) -> list[tuple[int, int, int, int]]:
    """(start, end, keep_start, keep_end) of each encoder window over ``length`` tokens; the kept parts
    tile [0, length) exactly. Windows advance by half a window and keep their middle half."""
    if length <= window:
        return [(0, length, 0, length)]
    stride, quarter, spans, start = window // 2, window // 4, [], 0
    while True:
        end = min(start + window, length)
        keep_start = 0 if start == 0 else start + quarter
        keep_end = length if end == length else start + window - quarter
        spans.append((start, end, keep_start, keep_end))
        if end == length:
            return spans
        start += stride


class Unlimiformer:
    """``model`` (an encoder-decoder ``PreTrainedModel``) with retrieval cross-attention; see the module."""

    def __init__(self, model: PreTrainedModel, config: UnlimiformerConfig | None = None, tokenizer=None) -> None:
        config = config if config is not None else UnlimiformerConfig()
        if not isinstance(model, PreTrainedModel) or not getattr(model.config, "is_encoder_decoder", False):
            raise ValueError(f"Unlimiformer needs an encoder-decoder model ({SUPPORTED}), got {type(model).__name__}")
        if not isinstance(config, UnlimiformerConfig):
            raise TypeError(f"expected an UnlimiformerConfig, got {type(config).__name__}")
        if not type(model)._can_set_attn_implementation():
            raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                             f"AttentionInterface, which retrieval needs; supported: {SUPPORTED}")
        decoder_modules = model.get_decoder().named_modules()
        cross = [m for name, m in decoder_modules if name.rsplit(".", 1)[-1] in CROSS_ATTENTION_NAMES]
        if not cross:
            raise ValueError(f"{type(model).__name__} has no cross-attention module named {CROSS_ATTENTION_NAMES}; "
                             f"supported: {SUPPORTED}")
        if config.layer_begin >= len(cross):
            raise ValueError(f"layer_begin ({config.layer_begin}) must be below the decoder's {len(cross)} layers")
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.retrieving = {module: _projections(module) for module in cross[config.layer_begin :]}
        max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "max_encoder_position_embeddings", None)
        self.window = config.window or max_positions or 512
        if max_positions and self.window > max_positions:
            raise ValueError(f"window ({self.window}) exceeds the encoder's {max_positions} positions")
        AttentionInterface.register(ATTENTION_NAME, unlimiformer_attention)

    # ------------------------------------------------------------------------------------------ input

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, progress: bool = False) -> EncodedInput:
        """Encode ids [batch, tokens] window by window into a new index of final encoder states."""
        input_ids = self._as_ids(input_ids)
        batch, length = input_ids.shape
        hidden = self.model.config.d_model
        index = create_index(self.config.index, dim=hidden, capacity=length, batch_size=batch, num_heads=1,
                             device=self.device, dtype=self.model.dtype, **self.config.index_kwargs)
        encoder, first = self.model.get_encoder(), None
        spans = encoder_windows(length, self.window)
        for start, end, keep_start, keep_end in tqdm(spans, desc="memlm encode", unit="window", disable=not progress):
            states = encoder(input_ids=input_ids[:, start:end]).last_hidden_state  # [batch, end - start, hidden]
            if first is None:
                first = states
            kept = states[:, keep_start - start : keep_end - start].unsqueeze(1)
            index.add(kept, kept)
        return EncodedInput(index=index, first_window=first, tokens=length)

    # ----------------------------------------------------------------------------------------- decode

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder logits [batch, n, vocab] of decoder_input_ids [batch, n] over the whole input."""
        encoded = self.encode(input_ids)
        with self._retrieval(encoded) as state:
            return self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.first_window),
                              decoder_input_ids=decoder_input_ids.to(self.device), unlimiformer=state).logits

    @torch.no_grad()
    def generate(self, input_ids_or_text, max_new_tokens: int = 128, do_sample: bool = False,
                 temperature: float = 1.0, eos_token_id: int | None = None, progress: bool = False):
        """Decode from the whole input, greedily or by sampling. Returns new ids [batch, n], or text for text.

        The input is text, ids [batch, tokens], or an ``EncodedInput`` from ``encode`` (to decode from one
        encoding several times)."""
        check_integer("max_new_tokens", max_new_tokens, 1)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        is_text = isinstance(input_ids_or_text, str)
        if isinstance(input_ids_or_text, EncodedInput):
            encoded = input_ids_or_text
        elif is_text:
            encoded = self.encode(self._tokenizer()(input_ids_or_text, return_tensors="pt")["input_ids"], progress)
        else:
            encoded = self.encode(input_ids_or_text, progress=progress)
        generation = self.model.generation_config
        eos = generation.eos_token_id if eos_token_id is None else eos_token_id
        eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        batch = encoded.first_window.shape[0]
        token = torch.full((batch, 1), generation.decoder_start_token_id, dtype=torch.long, device=self.device)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        # transformers 5.25 renamed the models' past_key_values to cache (the old name warns, and goes in 5.40)
        renamed = "cache" in inspect.signature(self.model.forward).parameters
        past = {"cache" if renamed else "past_key_values": cache}
        new, finished = [], torch.zeros(batch, dtype=torch.bool, device=self.device)
        with self._retrieval(encoded) as state:
            for _ in tqdm(range(max_new_tokens), desc="memlm generate", unit="tok", disable=not progress):
                logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.first_window),
                                    decoder_input_ids=token, use_cache=True, **past,
                                    unlimiformer=state).logits[:, -1].float()
                if do_sample:
                    token = torch.multinomial((logits / temperature).softmax(-1), 1)
                else:
                    token = logits.argmax(-1, keepdim=True)
                if eos:
                    token = torch.where(finished[:, None], next(iter(eos)), token)
                    finished |= torch.isin(token[:, 0], torch.tensor(sorted(eos), device=self.device))
                new.append(token)
                if bool(finished.all()):
                    break
        out = torch.cat(new, dim=1)
        if not is_text:
            return out
        texts = self._tokenizer().batch_decode(out, skip_special_tokens=True)
        return texts[0] if batch == 1 else texts

    # -------------------------------------------------------------------------------------- internals

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @contextlib.contextmanager
    def _retrieval(self, encoded: EncodedInput):
        """Switch the model to retrieval attention for the duration of one call."""
        previous = self.model.config._attn_implementation
        # "eager" is each model's own function, not in the registry; SDPA computes the same attention.
        fallback = ALL_ATTENTION_FUNCTIONS.get(previous) or ALL_ATTENTION_FUNCTIONS["sdpa"]
        state = RetrievalState(encoded, self.retrieving, self.config.top_k, fallback)
        self.model.set_attn_implementation(ATTENTION_NAME)
        try:
            yield state
        finally:
            self.model.set_attn_implementation(previous)

    def _as_ids(self, input_ids) -> torch.Tensor:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64) or ids.shape[1] == 0:
            raise ValueError(f"expected integer ids [batch, tokens], tokens >= 1, got {ids.dtype} {list(ids.shape)}")
        vocab = self.model.get_input_embeddings().num_embeddings
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab}), got values in [{int(ids.min())}, {int(ids.max())}]")
        return ids.long().to(self.device)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("text input needs a tokenizer: Unlimiformer(model, config, tokenizer=...) or pass ids")
        return self.tokenizer


@dataclass
class EncodedInput:
    """A long input after encoding: its index of final encoder states ([batch, 1 head, tokens, hidden])
    and the first window's states [batch, window, hidden] (for layers below ``layer_begin``)."""

    index: object
    first_window: torch.Tensor
    tokens: int


class RetrievalState:
    """What ``unlimiformer_attention`` needs during one call: the index and each retrieving module's projections."""

    def __init__(self, encoded: EncodedInput, retrieving: dict, top_k: int, fallback) -> None:
        self.index, self.retrieving, self.fallback = encoded.index, retrieving, fallback
        self.top_k = min(top_k, encoded.tokens)

    def attend(self, module: nn.Module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [batch, heads, n, head_dim] -> [batch, n, heads, head_dim] over each head's top-k states."""
        (w_k, b_k), (w_v, b_v) = self.retrieving[module]  # weights [heads, head_dim, hidden], biases [heads, head_dim]
        batch, heads, n, _ = query.shape
        retrieval = torch.einsum("bhnd,hdc->bhnc", query, w_k)  # W_k,h^T q_h
        found = self.index.search(retrieval.reshape(batch, 1, heads * n, -1), self.top_k)
        states = found.keys.reshape(batch, heads, n, self.top_k, -1).to(query.dtype)  # [b, h, n, k, hidden]
        keys = torch.einsum("bhnkc,hdc->bhnkd", states, w_k)
        values = torch.einsum("bhnkc,hdc->bhnkd", states, w_v)
        if b_k is not None:
            keys = keys + b_k[None, :, None, None]
        if b_v is not None:
            values = values + b_v[None, :, None, None]
        scores = torch.einsum("bhnd,bhnkd->bhnk", query, keys) * scaling
        scores = scores.masked_fill(~found.mask.view(batch, heads, n, self.top_k), float("-inf"))
        out = torch.einsum("bhnk,bhnkd->bhnd", scores.softmax(dim=-1), values)
        return out.transpose(1, 2)


def unlimiformer_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, unlimiformer=None,
                           **kwargs):
    """The attention function registered as ``"memlm_unlimiformer"``: retrieval for the retrieving
    cross-attention modules, the model's own attention for everything else."""
    if unlimiformer is None:
        raise RuntimeError(f"the {ATTENTION_NAME!r} attention runs only inside Unlimiformer.logits/generate calls")
    if module not in unlimiformer.retrieving:
        return unlimiformer.fallback(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                     **kwargs)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    return unlimiformer.attend(module, query, scaling), None


def _projections(module: nn.Module):
    """((W_k [heads, head_dim, hidden], b_k or None), (W_v ..., b_v ...)) of a cross-attention module."""
    for k_name, v_name in PROJECTIONS:
        k_proj, v_proj = getattr(module, k_name, None), getattr(module, v_name, None)
        if isinstance(k_proj, nn.Linear) and isinstance(v_proj, nn.Linear):
            heads = getattr(module, "num_heads", None) or getattr(module, "n_heads", None)
            split = [(p.weight.view(heads, -1, p.in_features),
                      None if p.bias is None else p.bias.view(heads, -1)) for p in (k_proj, v_proj)]
            return split[0], split[1]
    raise ValueError(f"{type(module).__name__} has no key/value projections named {PROJECTIONS}; "
                     f"supported: {SUPPORTED}")
