"""The streaming runtime: attach/detach, the registered attention functions, sessions and their stream state."""

from .model import MemoryModel, attach
from .session import FeedResult, Session

__all__ = ["FeedResult", "MemoryModel", "Session", "attach"]
