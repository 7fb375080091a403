"""memlm: long-term memory for Hugging Face language models.

Streams documents of any length through a model segment by segment, with Transformer-XL caches,
Memorizing-Transformer kNN memory (``memlm.index``) and fused memory attention (``memlm.kernels``).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memlm")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
