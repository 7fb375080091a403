"""attach / detach: give a Hugging Face decoder model a memory without touching its weights.

``attach`` checks everything first, then changes exactly three things: it registers memlm's attention
function for the model's attention implementation (``attention.py``), switches this model to it, and
hangs one module of new parameters on the model as ``memlm_memory`` (the per-head gates, the RMT
memory embeddings). ``detach`` undoes exactly those.

Models with absolute position embeddings (GPT-2) carry each token's position in its hidden states, so
a cached key cannot be moved: with ``position_mode="rebase"`` and an XL cache, cached and new tokens
would share positions. ``attach`` refuses that configuration; such models stream with ``xl_length=0``
(kNN memory and RMT restart positions every segment) or ``position_mode="absolute"`` (document
offsets, up to ``max_position_embeddings``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from memlm.config import MemoryConfig
from memlm.positions.rotary import find_rotary
from memlm.version import __version__

from .attention import register
from .session import HISTORY_TOKENS, Session
from .threads import ThreadPolicy

logger = logging.getLogger(__name__)

MODULE_NAME = "memlm_memory"
CONFIG_FILE = "memlm_config.json"
WEIGHTS_FILE = "memlm.safetensors"
SUPPORTED = "Llama, Mistral, Qwen2, GPT-2 (and other decoder-only models that use transformers' AttentionInterface)"


class MemoryModule(nn.Module):
    """memlm's own parameters on a model: one gate logit per memory layer and query head, and the
    RMT memory embeddings [rmt_tokens, hidden] read by a document's first segment (when rmt_tokens > 0)."""

    def __init__(self, config: MemoryConfig, num_memory_layers: int, num_heads: int, embeddings: nn.Embedding) -> None:
        super().__init__()
        device = embeddings.weight.device
        self.gates = nn.Parameter(torch.full((num_memory_layers, num_heads), float(config.gate_init), device=device))
        if config.rmt_tokens:
            # Start where the model's own token embeddings live, so the first segment reads familiar inputs.
            scale = embeddings.weight.detach().float().std().item()
            initial = torch.randn(config.rmt_tokens, embeddings.embedding_dim, device=device) * scale
            self.rmt_memory = nn.Parameter(initial.to(embeddings.weight.dtype))


class MemoryModel:
    """A model with memlm attached: opens sessions, saves its memlm weights, detaches."""

    def __init__(self, model: PreTrainedModel, config: MemoryConfig, tokenizer=None) -> None:
        # Every check runs before the model is touched.
        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"attach expects a transformers PreTrainedModel, got {type(model).__name__}")
        if not isinstance(config, MemoryConfig):
            raise TypeError(f"attach expects a MemoryConfig, got {type(config).__name__}")
        if hasattr(model, MODULE_NAME):
            raise ValueError(f"{type(model).__name__} already has memlm attached; detach() it first")
        name = type(model).__name__
        if getattr(model.config, "is_encoder_decoder", False) or not type(model)._can_set_attn_implementation():
            raise ValueError(f"memlm cannot attach to {name}: supported are {SUPPORTED}")
        if not callable(getattr(model, "get_output_embeddings", None)) or model.get_output_embeddings() is None:
            raise ValueError(f"memlm needs a causal language model with an LM head, got {name}; supported: {SUPPORTED}")
        self.memory_layers = config.resolve_layers(model.config.num_hidden_layers)
        self.pooled_from = config.resolve_pooled_from(model.config.num_hidden_layers)
        self.rotary = find_rotary(model)
        self.max_positions = None
        if self.rotary is None and config.distance_cap is not None:
            raise ValueError(f"distance_cap re-rotates keys and needs a rotary model; {name} has absolute position "
                             "embeddings")
        if self.rotary is None and config.block_span:
            raise ValueError(f"retrieval='blocks' rotates the blocks it reads to just before the local context and "
                             f"needs a rotary model; {name} has absolute position embeddings (use retrieval='tokens')")
        if self.rotary is None:  # absolute position embeddings (GPT-2): see the module docstring
            self.max_positions = model.config.max_position_embeddings
            if config.position_mode == "rebase" and config.xl_length:
                raise ValueError(
                    f"{name} has absolute position embeddings: a cached token keeps the position it was computed "
                    f"at, so position_mode='rebase' with xl_length={config.xl_length} would give cached and new "
                    "tokens the same positions; use xl_length=0 (kNN memory and RMT restart positions every "
                    "segment) or position_mode='absolute' (document offsets, up to max_position_embeddings="
                    f"{self.max_positions})"
                )
            local = config.segment_length + 2 * config.rmt_tokens
            if local > self.max_positions:
                raise ValueError(
                    f"segment_length + 2 * rmt_tokens = {local} exceeds {name}'s "
                    f"max_position_embeddings ({self.max_positions})"
                )
        embedding_size = model.get_input_embeddings().embedding_dim
        if config.rmt_tokens and embedding_size != model.config.hidden_size:
            raise ValueError(
                f"rmt_tokens needs hidden size == embedding size (write outputs become read inputs); {name} has "
                f"{model.config.hidden_size} and {embedding_size}"
            )
        window = getattr(model.config, "sliding_window", None)
        if self.memory_layers and isinstance(window, int) and config.xl_length > window:
            logger.warning("%s slides a window of %d tokens: with xl_length=%d, tokens between the window and the "
                           "end of the XL cache reach the memory layers neither locally nor by retrieval; set "
                           "xl_length <= %d", name, window, config.xl_length, window)
        if tokenizer is not None and not callable(tokenizer):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")

        self.previous_attention = model.config._attn_implementation or "eager"
        name = register(self.previous_attention)  # raises for implementations a session cannot stream with

        self.model, self.config, self.tokenizer = model, config, tokenizer
        model.set_attn_implementation(name)
        module = MemoryModule(config, len(self.memory_layers), model.config.num_attention_heads,
                              model.get_input_embeddings())
        model.add_module(MODULE_NAME, module)
        self._attached = True

    @property
    def memory_module(self) -> MemoryModule:
        self.check_attached()
        return getattr(self.model, MODULE_NAME)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layer_devices(self) -> dict[int, torch.device]:
        """layer -> the device of its attention (a model dispatched over devices has several)."""
        return layer_devices(self.model, self.model.config.num_hidden_layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def session(self, batch_size: int = 1, crossbatch=None, store=None, documents=None,
                history_tokens: int | None = HISTORY_TOKENS, threads: int | ThreadPolicy | None = None):
        """A new document session (a context manager): ``with mem_model.session() as s: ...``.

        ``crossbatch``: a ``memlm.CrossBatch`` for Focused-Transformer training (``crossbatch.py``): memory
        layers then attend to a differentiable memory of their own and other rows' recent contexts
        instead of the kNN index.
        ``store``, ``documents``: start from documents stored in a ``memlm.store.MemoryStore`` (batch 1). One
        document: the session continues exactly where its ingestion ended (memory, XL cache, RMT memory).
        Several: their memories are loaded into the index in the given order and the local context
        starts empty. The FIFO ``memory_capacity`` applies (see ``documents.py`` for large corpora).
        ``history_tokens``: the token ids kept per row (generation's logits processors see them, e.g. a repetition
        penalty; ``save_document`` needs all of a document's): the last 2**20 by default, so a stream of any length
        holds at most 8 MiB of them; None keeps every one.
        ``threads``: the most intra-op threads a forward runs on (default: ``torch.get_num_threads()`` here); each
        forward takes fewer where its work would not pay for them or other processes hold the cores (``threads.py``;
        a ``ThreadPolicy(limit, adaptive=False)`` fixes the count).
        """
        self.check_attached()
        return Session(self, batch_size=batch_size, crossbatch=crossbatch, store=store, documents=documents,
                       history_tokens=history_tokens, threads=threads)

    def detach(self) -> PreTrainedModel:
        """Remove everything attach added and return the original model."""
        self.check_attached()
        delattr(self.model, MODULE_NAME)
        self.model.set_attn_implementation(self.previous_attention)
        self._attached = False
        return self.model

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the memlm config (JSON) and memlm's parameters (safetensors); not the base model."""
        self.check_attached()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"memlm_version": __version__, **self.config.to_dict()}
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {name: t.detach().contiguous().cpu() for name, t in self.memory_module.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, model: PreTrainedModel, directory: str | Path, tokenizer=None) -> MemoryModel:
        """Attach the memlm config and parameters saved by ``save_pretrained`` to ``model``."""
        directory = Path(directory)
        for file in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / file).is_file():
                raise FileNotFoundError(f"{directory / file} not found: expected a directory made by save_pretrained")
        values = json.loads((directory / CONFIG_FILE).read_text())
        values.pop("memlm_version", None)
        weights = load_file(str(directory / WEIGHTS_FILE))
        mem_model = cls(model, MemoryConfig.from_dict(values), tokenizer=tokenizer)
        try:
            mem_model.memory_module.load_state_dict(weights)
        except RuntimeError as error:
            mem_model.detach()
            raise ValueError(f"{directory / WEIGHTS_FILE} does not fit this model: {error}") from error
        return mem_model

    def check_attached(self) -> None:
        if not self._attached:
            raise RuntimeError("this MemoryModel was detached; attach the model again to use memlm")

    def __repr__(self) -> str:
        state = "attached" if self._attached else "detached"
        return f"MemoryModel({type(self.model).__name__}, {state}, memory_layers={self.memory_layers}, {self.config})"


def attach(model: PreTrainedModel, config: MemoryConfig | None = None, tokenizer=None) -> MemoryModel:
    """Give ``model`` a memory described by ``config`` (default ``MemoryConfig()``); see ``MemoryModel``."""
    return MemoryModel(model, config if config is not None else MemoryConfig(), tokenizer=tokenizer)


def layer_devices(model: nn.Module, num_layers: int) -> dict[int, torch.device]:
    """layer -> the device of the parameters of the modules that serve it (transformers gives every attention
    module its ``layer_idx``); layers without such a module get the device of the model's first parameter."""
    default = next(model.parameters()).device
    devices = {}
    for module in model.modules():
        layer = getattr(module, "layer_idx", None)
        if isinstance(layer, int) and layer not in devices:
            parameter = next(module.parameters(recurse=True), None)
            if parameter is not None:
                devices[layer] = parameter.device
    return {layer: devices.get(layer, default) for layer in range(num_layers)}
