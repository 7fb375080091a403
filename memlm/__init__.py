"""memlm: long-term memory for Hugging Face language models.

Streams documents of any length through a model segment by segment, with Transformer-XL caches,
Memorizing-Transformer kNN memory (``memlm.index``) and fused memory attention (``memlm.kernels``).

    from memlm import MemoryConfig, attach
    mem_model = attach(model, MemoryConfig(segment_length=512, xl_length=512), tokenizer=tok)
    with mem_model.session() as session:
        session.feed(long_text)
        answer = session.generate(question, max_new_tokens=64)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memlm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

# Imported after __version__, which model.py reads.
from .config import MemoryConfig
from .crossbatch import CrossBatch
from .model import MemoryModel, attach
from .session import FeedResult, Session
from .store import MemoryStore
from .tiny import load_default

__all__ = ["CrossBatch", "FeedResult", "MemoryConfig", "MemoryModel", "MemoryStore", "Session", "__version__",
           "attach", "load_default"]
