"""Where a job's bytes go: weight maps turned into pieces on storage servers.

Plain functions and a small class over plain data, unit-tested without servers.
"""

from __future__ import annotations

from typing import Iterable, Mapping

#: Objects at least this large are split across the weight map's servers.
DEFAULT_SPLIT_SIZE = 8 << 20


class WeightedChooser:
    """Smooth weighted round robin: over many picks each node's share matches
    its weight exactly (±1 pick), and picks are interleaved, not bunched."""

    def __init__(self, weights: Mapping[str, float]) -> None:
        self.weights = {node: float(w) for node, w in weights.items() if w > 0}
        self._current = {node: 0.0 for node in self.weights}

    def choose(self, exclude: Iterable[str] = ()) -> str:
        """The next node, skipping ``exclude``; raises LookupError if none is left."""
        excluded = set(exclude)
        candidates = [n for n in self.weights if n not in excluded]
        if not candidates:
            raise LookupError("no storage server available")
        total = sum(self.weights[n] for n in candidates)
        best = None
        for node in candidates:
            self._current[node] += self.weights[node]
            if best is None or self._current[node] > self._current[best]:
                best = node
        self._current[best] -= total
        return best


def split_by_weight(size: int, weights: Mapping[str, float], granule: int,
                    min_piece: int) -> list[tuple[str, int]]:
    """Cut ``size`` bytes into pieces proportional to ``weights``.

    Pieces are multiples of ``granule`` (except the last byte count absorbs
    the remainder) and none is smaller than ``min_piece``: nodes whose share
    would be smaller are left out.  Heaviest nodes first.
    """
    if size <= 0:
        raise ValueError("size must be positive")
    nodes = sorted(((n, w) for n, w in weights.items() if w > 0), key=lambda nw: (-nw[1], nw[0]))
    if not nodes:
        raise LookupError("no storage server available")
    total = sum(w for _, w in nodes)
    kept = [(n, w) for n, w in nodes if size * w / total >= min_piece] or nodes[:1]
    total = sum(w for _, w in kept)
    pieces = []
    assigned = 0
    for node, w in kept[1:]:
        share = int(size * w / total) // granule * granule
        if share:
            pieces.append((node, share))
            assigned += share
    pieces.insert(0, (kept[0][0], size - assigned))
    return pieces


def plan_pieces(size: int, chooser: WeightedChooser, *, granule: int = 4096,
                split_size: int = DEFAULT_SPLIT_SIZE, exclude: Iterable[str] = ()) -> list[tuple[str, int]]:
    """Pieces ``[(node, nbytes)]`` for an object of ``size`` bytes.

    Objects smaller than ``split_size`` go whole to the next node of the
    weighted round robin; larger ones are split across all nodes by weight.
    """
    excluded = set(exclude)
    if size < split_size:
        return [(chooser.choose(excluded), size)]
    weights = {n: w for n, w in chooser.weights.items() if n not in excluded}
    return split_by_weight(size, weights, granule, split_size // 2)
