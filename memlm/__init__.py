"""memlm: long-term memory for Hugging Face language models.

Streams documents of any length through a model segment by segment, with Transformer-XL caches,
Memorizing-Transformer kNN memory (``memlm.index``) and fused memory attention (``memlm.kernels``).

    from memlm import MemoryConfig, attach
    mem_model = attach(model, MemoryConfig(segment_length=512, xl_length=512), tokenizer=tok)
    with mem_model.session() as session:
        session.feed(long_text)
        answer = session.generate(question, max_new_tokens=64)
"""

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
from memlm.version import __version__

__all__ = ["CrossBatch", "FeedResult", "MemoryConfig", "MemoryModel", "MemoryStore", "Session", "SinkCache",
           "ThreadPolicy", "__version__", "attach", "extend_context", "load_default", "load_pretrained",
           "ring_shard_inputs", "use_attention"]
