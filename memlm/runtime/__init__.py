"""The streaming runtime: attach/detach, the registered attention functions, sessions and their stream state."""

from .model import MemoryModel, attach
from .session import FeedResult, Session
from .threads import ThreadPolicy

__all__ = ["FeedResult", "MemoryModel", "Session", "ThreadPolicy", "attach"]
