"""Live panels of the engine's insides, drawn from StepEvents only."""

from .panel import BatchPanel, Dashboard, KVCachePanel, Panel, SchedulerPanel

__all__ = ["BatchPanel", "Dashboard", "KVCachePanel", "Panel", "SchedulerPanel"]
