"""Long-book summarization: Unlimiformer retrieval over encoder states and the chapter-by-chapter summarizer."""

from .summarizer import Summarizer, Summary, load, rouge, split_chapters, to_markdown
from .unlimiformer import Unlimiformer, UnlimiformerConfig

__all__ = ["Summarizer", "Summary", "Unlimiformer", "UnlimiformerConfig", "load", "rouge", "split_chapters",
           "to_markdown"]
