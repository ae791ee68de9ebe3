"""Metadata servers: ``python -m pocket.metadata``."""

from .placement import WeightedChooser, plan_pieces, split_by_weight
from .server import MetadataServer

__all__ = ["MetadataServer", "WeightedChooser", "plan_pieces", "split_by_weight"]
