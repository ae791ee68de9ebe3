"""Where a job's bytes go: weight maps turned into pieces on storage servers.

Plain functions and a small class over plain data, unit-tested without servers.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

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

    def choose_many(self, count: int, exclude: Iterable[str] = ()) -> list[str]:
        """The next ``count`` distinct nodes, skipping ``exclude`` (LookupError if too few).

        Smooth weighted round robin over sets: each pick adds ``count`` ×
        each candidate's weight to its credit and takes the ``count`` nodes
        with the most credit, each paying the candidates' total weight.  Over
        many picks a node is in its weight's share of the sets (×
        ``count``), except that no node can be in more than all of them.
        ``choose_many(1)`` picks what :meth:`choose` picks.
        """
        excluded = set(exclude)
        candidates = [n for n in self.weights if n not in excluded]
        if len(candidates) < count:
            raise LookupError(f"{count} distinct storage servers needed; "
                              f"{len(candidates)} available")
        total = sum(self.weights[n] for n in candidates)
        current = self._current
        for node in candidates:
            current[node] += count * self.weights[node]
        chosen = sorted(candidates, key=lambda n: -current[n])[:count]
        for node in chosen:
            current[node] -= total
        # A node whose share exceeds 1/count is in every set, so credits drift apart; kept
        # bounded, they cannot crowd some nodes out for long after an outage.
        bound = count * total
        for node in candidates:
            current[node] = max(-bound, min(bound, current[node]))
        return chosen


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


def choose_copies(levels: Sequence[WeightedChooser], count: int,
                  exclude: Iterable[str] = ()) -> list[str]:
    """``count`` distinct nodes outside ``exclude``: from the first level (the weight map) as
    far as it has them, then from the next ones (spill levels); LookupError if too few."""
    excluded = set(exclude)
    chosen: list[str] = []
    for chooser in levels:
        room = sum(1 for n in chooser.weights if n not in excluded)
        take = min(count - len(chosen), room)
        if take > 0:
            got = chooser.choose_many(take, excluded)
            chosen.extend(got)
            excluded.update(got)
        if len(chosen) == count:
            return chosen
    raise LookupError(f"{count} copies need {count} distinct storage servers; "
                      f"{len(chosen)} available")


def plan_replicated(size: int, levels: Sequence[WeightedChooser], replicas: int, *,
                    granule: int = 4096, split_size: int = DEFAULT_SPLIT_SIZE,
                    exclude: Iterable[str] = ()) -> list[list[tuple[str, int]]]:
    """Pieces of a replicated object: ``[[(node, nbytes)] × replicas, ...]``, the copies of
    each piece on ``replicas`` **distinct** nodes.

    ``levels`` are the job's weight map followed by its spill levels; pieces
    go to the first level that has a node outside ``exclude`` (then the next
    ones when it has fewer than ``replicas``).

    * Below ``split_size``: one piece, its copies on the next ``replicas``
      nodes of a weighted round robin over sets
      (:meth:`WeightedChooser.choose_many`), so every node holds its weight's
      share of the copies.
    * Larger: cut by weight as :func:`plan_pieces` cuts an unreplicated
      object, and each piece's next copy put on the node of the next piece
      (chained declustering): each node holds its own piece and a copy of
      its neighbour's, and a dead node's reads fall on its neighbour.

    LookupError (saying how many nodes there are) when fewer than
    ``replicas`` nodes outside ``exclude`` exist.
    """
    excluded = set(exclude)
    available = set().union(*(c.weights for c in levels)) - excluded if levels else set()
    if len(available) < replicas:
        raise LookupError(f"{replicas} copies need {replicas} distinct storage servers; "
                          f"{len(available)} available")
    first = next(i for i, c in enumerate(levels) if any(n not in excluded for n in c.weights))
    levels = levels[first:]
    if size < split_size:
        return [[(n, size) for n in choose_copies(levels, replicas, excluded)]]
    primaries = plan_pieces(size, levels[0], granule=granule, split_size=split_size,
                            exclude=excluded)
    if len(primaries) >= replicas:  # distinct nodes: split_by_weight gives one piece a node
        return [[(primaries[(k + j) % len(primaries)][0], nbytes) for j in range(replicas)]
                for k, (_node, nbytes) in enumerate(primaries)]
    pieces = []
    for node, nbytes in primaries:
        others = choose_copies(levels, replicas - 1, excluded | {node})
        pieces.append([(node, nbytes), *((n, nbytes) for n in others)])
    return pieces
