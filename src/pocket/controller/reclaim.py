"""When the extents of a metadata server may be freed on storage servers.

A metadata server keeps its namespaces (names → extents) in memory only, so
when it dies or restarts, the extents it allocated can never be read or freed
through it again.  Storage servers group extents by the allocating metadata
server's *instance* id (a random id made at each start: a restarted server
is a new owner; one that merely reconnects to the controller is the same)
and list the owners they hold in each heartbeat.  The controller frees an
owner's extents (``EXT_RECLAIM``) once no registered metadata server has that
instance id and none has had it for ``grace`` seconds — counted from the
controller's own start for owners it never saw, so that after a controller
restart the live metadata servers have time to register again.

The rule is level-triggered (it is applied to every storage heartbeat that
still lists a dead owner), so a storage server that was unreachable when the
owner died is told as soon as it is heard from again.

:class:`OwnerWatch` is the rule over plain data: events in, decisions out.
"""

from __future__ import annotations

from typing import Iterable

#: Default ``--reclaim-after``: ten node timeouts, so that a metadata server whose
#: controller link blips (or that is briefly partitioned) never loses its data.
DEFAULT_RECLAIM_AFTER = 30.0
#: Forget an owner this many ``grace`` periods after it was last seen alive (its
#: extents are reclaimed long before; an unknown owner counts as dead since start).
FORGET_AFTER_GRACES = 4


class OwnerWatch:
    """Tracks metadata server instances and says which owners' extents are reclaimable."""

    def __init__(self, grace: float, now: float) -> None:
        if grace <= 0:
            raise ValueError("the reclaim grace period must be positive")
        self.grace = grace
        self.started = now
        #: Owner → when a registered metadata server last had it (monotonic seconds).
        self.last_alive: dict[str, float] = {}

    def alive(self, owners: Iterable[str], now: float) -> None:
        """The instance ids of the metadata servers registered now (called on their heartbeats)."""
        for owner in owners:
            self.last_alive[owner] = now

    def reclaimable(self, reported: Iterable[str], live: set[str], now: float) -> list[str]:
        """Of the owners a storage server ``reported``, those whose extents it should free."""
        dead = []
        for owner in reported:
            if owner in live:
                self.last_alive[owner] = now
            elif now - self.last_alive.get(owner, self.started) >= self.grace:
                dead.append(owner)
        return dead

    def silent_for(self, owner: str, now: float) -> float:
        """Seconds since a registered metadata server last had ``owner`` (sent with
        EXT_RECLAIM: a storage server that heard from the owner more recently refuses)."""
        return now - self.last_alive.get(owner, self.started)

    def prune(self, live: set[str], now: float) -> None:
        """Forget owners not seen for a long time (bounded memory); forgetting is safe:
        an unknown owner counts as last seen at the controller's start."""
        horizon = now - FORGET_AFTER_GRACES * self.grace
        for owner in [o for o, t in self.last_alive.items() if t < horizon and o not in live]:
            del self.last_alive[owner]
