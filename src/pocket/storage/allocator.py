"""Block allocator: free space as sorted runs of blocks, first fit, coalescing frees.

Pure bookkeeping over block numbers, shared by every tier (an arena in DRAM,
a file on flash).  A request for ``n`` blocks is met by one run when one is
large enough (so a large object costs a few requests, not thousands) and by
several runs otherwise.
"""

from __future__ import annotations

from bisect import bisect_left

from ..errors import CapacityExceeded


class BlockAllocator:
    """Allocates runs of blocks out of ``total_blocks``."""

    def __init__(self, total_blocks: int) -> None:
        if total_blocks < 0:
            raise ValueError("total_blocks must be non-negative")
        self.total_blocks = total_blocks
        self.free_blocks = total_blocks
        self._starts: list[int] = [0] if total_blocks else []
        self._lengths: dict[int, int] = {0: total_blocks} if total_blocks else {}

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def free_runs(self) -> list[tuple[int, int]]:
        """The free runs as ``(start, length)``, in block order."""
        return [(s, self._lengths[s]) for s in self._starts]

    def allocate(self, nblocks: int) -> list[tuple[int, int]]:
        """Take ``nblocks`` blocks; return the runs ``(start, length)`` in order.

        Raises :class:`CapacityExceeded` (taking nothing) when they do not fit.
        """
        if nblocks <= 0:
            raise ValueError("nblocks must be positive")
        if nblocks > self.free_blocks:
            raise CapacityExceeded(
                f"need {nblocks} blocks, {self.free_blocks} of {self.total_blocks} free")
        lengths = self._lengths
        for index, start in enumerate(self._starts):
            if lengths[start] >= nblocks:
                self._take(index, start, nblocks)
                return [(start, nblocks)]
        # Fragmented: take the largest runs first so the object has few extents.
        runs: list[tuple[int, int]] = []
        remaining = nblocks
        for start in sorted(self._starts, key=lambda s: -lengths[s]):
            take = min(lengths[start], remaining)
            runs.append((start, take))
            remaining -= take
            if not remaining:
                break
        for start, take in runs:
            self._take(self._starts.index(start), start, take)
        runs.sort()
        return runs

    def _take(self, index: int, start: int, nblocks: int) -> None:
        length = self._lengths.pop(start)
        self.free_blocks -= nblocks
        if length == nblocks:
            del self._starts[index]
        else:
            self._starts[index] = start + nblocks
            self._lengths[start + nblocks] = length - nblocks

    def free(self, start: int, nblocks: int) -> None:
        """Return a run; neighbours are merged. Freeing free space raises ValueError."""
        if nblocks <= 0 or start < 0 or start + nblocks > self.total_blocks:
            raise ValueError(f"run ({start}, {nblocks}) is outside the allocator")
        starts, lengths = self._starts, self._lengths
        index = bisect_left(starts, start)
        if index < len(starts) and starts[index] < start + nblocks:
            raise ValueError(f"run ({start}, {nblocks}) overlaps free space")
        if index > 0:
            prev = starts[index - 1]
            if prev + lengths[prev] > start:
                raise ValueError(f"run ({start}, {nblocks}) overlaps free space")
        self.free_blocks += nblocks
        merge_next = index < len(starts) and starts[index] == start + nblocks
        merge_prev = index > 0 and starts[index - 1] + lengths[starts[index - 1]] == start
        if merge_next:
            nxt = starts[index]
            nblocks += lengths.pop(nxt)
            del starts[index]
        if merge_prev:
            lengths[starts[index - 1]] += nblocks
        else:
            starts.insert(index, start)
            lengths[start] = nblocks
