"""Evaluation: long-context tasks on real text (``tasks.py``), run side by side in several modes (``runner.py``),
the passkey test of the demo (``passkey.py``), and a bridge to lm-evaluation-harness (``harness.py``)."""

from .runner import MODES, Mode, evaluate, perplexity, table
from .tasks import TASKS, Haystack, Sample, make_sample, score

__all__ = ["MODES", "TASKS", "Haystack", "Mode", "Sample", "evaluate", "make_sample", "perplexity", "score", "table"]
