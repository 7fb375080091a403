"""memlm: long-term memory for Hugging Face language models.

Streams documents of any length through a model segment by segment, with Transformer-XL caches,
Memorizing-Transformer kNN memory (``memlm.index``) and fused memory attention (``memlm.kernels``).

    from memlm import MemoryConfig, attach
    mem_model = attach(model, MemoryConfig(segment_length=512, xl_length=512), tokenizer=tok)
    with mem_model.session() as session:
        session.feed(long_text)
        answer = session.generate(question, max_new_tokens=64)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from memlm.version import __version__

#: the public names and the modules that define them, imported on first use: ``import memlm`` (and so every
#: ``memlm`` command, ``memlm --version`` included) costs no torch or transformers import until one is needed
EXPORTS = {
    "CrossBatch": "memlm.memory.crossbatch", "FeedResult": "memlm.runtime.session", "MemoryConfig": "memlm.config",
    "MemoryModel": "memlm.runtime.model", "MemoryStore": "memlm.store", "Session": "memlm.runtime.session",
    "SinkCache": "memlm.runtime.sink_cache", "ThreadPolicy": "memlm.runtime.threads", "attach": "memlm.runtime.model",
    "extend_context": "memlm.positions.scaling", "load_default": "memlm.tiny", "load_pretrained": "memlm.models",
    "ring_shard_inputs": "memlm.runtime.implementations", "use_attention": "memlm.runtime.implementations",
}

__all__ = ["CrossBatch", "FeedResult", "MemoryConfig", "MemoryModel", "MemoryStore", "Session", "SinkCache",
           "ThreadPolicy", "__version__", "attach", "extend_context", "load_default", "load_pretrained",
           "ring_shard_inputs", "use_attention"]


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'memlm' has no attribute {name!r}")
    value = getattr(importlib.import_module(EXPORTS[name]), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *EXPORTS})


if TYPE_CHECKING:  # what static checkers and IDEs resolve the names to
    from memlm.config import MemoryConfig
    from memlm.memory.crossbatch import CrossBatch
    from memlm.models import load_pretrained
    from memlm.positions.scaling import extend_context
    from memlm.runtime.implementations import ring_shard_inputs, use_attention
    from memlm.runtime.model import MemoryModel, attach
    from memlm.runtime.session import FeedResult, Session
    from memlm.runtime.sink_cache import SinkCache
    from memlm.runtime.threads import ThreadPolicy
    from memlm.store import MemoryStore
    from memlm.tiny import load_default
