"""The controller: ``python -m pocket.controller``."""

from .server import ControllerServer

__all__ = ["ControllerServer"]
