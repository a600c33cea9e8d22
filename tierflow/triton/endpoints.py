"""Where a Triton stage's requests go: the endpoints and their health.

:class:`EndpointPool` balances calls over one or more gRPC endpoints serving the same
model (least in flight, ties round robin; endpoints on the caller's own node first when it says
which) and takes one that fails out of rotation for an exponential cool-down (its length from
:class:`~tierflow.retry.RetryPolicy`); its endpoint set can be replaced while calls run
(a deployment's servers changed).
No gRPC here: the pool hands out endpoints and keeps score; the client makes the calls.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tierflow.retry import RetryPolicy

__all__ = ["Endpoint", "EndpointPool", "EndpointState", "EndpointStats"]

_log = logging.getLogger(__name__)


EndpointState = Literal["healthy", "trial", "out"]


@dataclass(frozen=True, slots=True)
class EndpointStats:
    """One endpoint of a :class:`TritonStageClient`, as :meth:`~TritonStageClient.endpoint_stats`
    reports it. Counters start when the client is built (or unpickled) in this process.

    Attributes:
        url: The endpoint's gRPC address.
        state: ``"healthy"`` (in rotation), ``"out"`` (cooling down after a failure) or
            ``"trial"`` (back from a cool-down or a readiness poll: one request at a time
            until one succeeds).
        in_flight: Calls sent to it and not yet answered.
        sent: Calls sent to it (inference requests and the config fetch; each retry counts).
        succeeded: Calls it answered (an answer that is a model error counts too).
        failed: Calls that failed with a retryable error.
        removals: Times it was taken out of rotation.
        last_error: The reason of its last retryable failure, ``""`` if none.
        preferred: Whether it is preferred (on the caller's node): used first while available.
    """

    url: str
    state: EndpointState
    in_flight: int
    sent: int
    succeeded: int
    failed: int
    removals: int
    last_error: str
    preferred: bool = False


class Endpoint:
    """One URL: its lazily built gRPC client and its health. Guarded by the pool's lock."""

    __slots__ = (
        "client",
        "down_until",
        "epoch",
        "failed",
        "in_flight",
        "last_error",
        "pid",
        "removals",
        "sent",
        "strikes",
        "succeeded",
        "trial_busy",
        "url",
    )

    def __init__(self, url: str) -> None:
        self.url = url
        self.client: Any = None
        self.pid: int | None = None
        self.in_flight = 0
        self.strikes = 0  # failures in a row; > 0 means out or on trial
        self.down_until = 0.0  # out of rotation until then (clock time)
        self.epoch = 0  # bumped when taken out: failures of calls sent before are the same outage
        self.trial_busy = False  # on trial, and its one call is in flight
        self.sent = self.succeeded = self.failed = self.removals = 0
        self.last_error = ""


class EndpointPool:
    """Where the next call goes, and which endpoints are out of rotation. Thread-safe.

    An endpoint is *healthy* (takes any number of calls), *out* (skipped until its
    cool-down ends) or on *trial* (cool-down over, or a readiness poll said ready: one call
    at a time, and its success makes the endpoint healthy again, its failure sends it out
    for twice as long). Picking is least-in-flight among the available endpoints, ties
    broken round robin, so a slow endpoint gets fewer calls. *Preferred* endpoints (those on
    the caller's node) are picked first whenever one of them is available; the others only
    when none is.

    A failure takes an endpoint out once per outage: every call records the endpoint's
    epoch when sent, and only a failure of a call sent in the current epoch counts a strike
    (the calls that were in flight when the server died fail too, but they are the same
    event).
    """

    def __init__(
        self,
        urls: tuple[str, ...],
        factory: Callable[[str], Any],
        policy: RetryPolicy,
        clock: Callable[[], float],
        preferred: Collection[str] = (),
    ) -> None:
        self.endpoints = [Endpoint(url) for url in urls]
        self._preferred = frozenset(preferred)
        self._factory = factory
        self._policy = policy
        self._clock = clock
        self._cond = threading.Condition(threading.Lock())
        self._next = 0  # round-robin start

    def _available(self, ep: Endpoint, now: float) -> bool:
        if ep.strikes == 0:
            return True
        return now >= ep.down_until and not ep.trial_busy

    def _settle(self, ep: Endpoint, epoch: int) -> None:
        # Calls still in flight from before the endpoint went out (old epoch) do not hold up
        # its trial: they may be hung on a dead connection until their deadline.
        ep.in_flight -= 1
        if epoch == ep.epoch:
            ep.trial_busy = False

    def client(self, ep: Endpoint) -> Any:
        """``ep``'s gRPC client, built on first use in this process."""
        with self._cond:
            # A client inherited across fork() hangs or fails (server#7690): rebuild it.
            if ep.client is None or ep.pid != os.getpid():
                ep.client = self._factory(ep.url)
                ep.pid = os.getpid()
            return ep.client

    def acquire(self) -> tuple[Endpoint, int] | None:
        """Pick an endpoint for one call and count it in flight; ``None`` if none can take it.

        Returns:
            The endpoint and its epoch (hand both back to :meth:`succeeded`,
            :meth:`failed` or :meth:`dropped`).
        """
        with self._cond:
            now = self._clock()
            n = len(self.endpoints)
            best: int | None = None
            best_rank = (True, 0)
            for k in range(n):
                j = (self._next + k) % n
                ep = self.endpoints[j]
                rank = (ep.url not in self._preferred, ep.in_flight)  # preferred first
                if self._available(ep, now) and (best is None or rank < best_rank):
                    best, best_rank = j, rank
            if best is None:
                return None
            self._next = (best + 1) % n
            ep = self.endpoints[best]
            ep.in_flight += 1
            ep.sent += 1
            ep.trial_busy = ep.strikes > 0
            return ep, ep.epoch

    def succeeded(self, ep: Endpoint, epoch: int) -> None:
        """The call answered: a call sent in the current epoch makes the endpoint healthy."""
        with self._cond:
            self._settle(ep, epoch)
            ep.succeeded += 1
            if epoch == ep.epoch and ep.strikes:
                ep.strikes = 0
                _log.info("Triton endpoint %s is back in rotation", ep.url)
            self._cond.notify_all()

    def failed(self, ep: Endpoint, epoch: int, reason: str) -> None:
        """The call failed retryably: take the endpoint out unless this outage already did."""
        with self._cond:
            self._settle(ep, epoch)
            ep.failed += 1
            ep.last_error = reason
            if epoch == ep.epoch:
                ep.strikes += 1
                ep.epoch += 1
                ep.removals += 1
                cooldown = self._policy.cooldown_for(ep.strikes)
                ep.down_until = self._clock() + cooldown
                _log.warning(
                    "Triton endpoint %s out of rotation for %.3gs (failure %d in a row): %s",
                    ep.url,
                    cooldown,
                    ep.strikes,
                    reason,
                )
            self._cond.notify_all()

    def dropped(self, ep: Endpoint, epoch: int) -> None:
        """The call was abandoned (cancelled while raising): neither success nor failure."""
        with self._cond:
            self._settle(ep, epoch)
            self._cond.notify_all()

    def readmit(self, ep: Endpoint) -> None:
        """A readiness poll said ready: end the cool-down (the endpoint goes on trial)."""
        with self._cond:
            ep.down_until = min(ep.down_until, self._clock())
            self._cond.notify_all()

    def replace(self, urls: Sequence[str], preferred: Collection[str] = ()) -> bool:
        """Make ``urls`` the endpoint set, in that order, and ``preferred`` the preferred ones.

        An endpoint that stays keeps its health, counters and gRPC client; a new one starts
        healthy; one that goes leaves rotation at once (its calls in flight end as they
        would have, and a failed one is resent to the endpoints left). Thread-safe.

        Returns:
            Whether the set or the preference changed.
        """
        with self._cond:
            old = {ep.url: ep for ep in self.endpoints}
            keep = set(urls)
            preferred_now = frozenset(preferred) & keep
            changed = list(old) != list(urls) or preferred_now != self._preferred
            self.endpoints = [old.get(url) or Endpoint(url) for url in urls]
            self._preferred = preferred_now
            self._next = self._next % len(self.endpoints) if self.endpoints else 0
            gone = [ep for url, ep in old.items() if url not in keep]
            self._cond.notify_all()
        for ep in gone:
            _log.info("Triton endpoint %s removed from the pool", ep.url)
            # A channel with calls in flight is left to the garbage collector: closing it
            # would cancel calls that may still be answered.
            if ep.in_flight == 0 and ep.client is not None and ep.pid == os.getpid():
                with contextlib.suppress(Exception):
                    ep.client.close()
        return changed

    def all_out(self) -> bool:
        """Whether every endpoint is cooling down (a trial endpoint that is busy is not out)."""
        with self._cond:
            now = self._clock()
            return all(ep.strikes and now < ep.down_until for ep in self.endpoints)

    def wait(self, timeout_s: float) -> None:
        """Block until some call ends or an endpoint is readmitted, at most ``timeout_s``."""
        with self._cond:
            now = self._clock()
            if not any(self._available(ep, now) for ep in self.endpoints):
                self._cond.wait(timeout_s)

    def by_cooldown_end(self) -> list[Endpoint]:
        """Every endpoint, the one whose cool-down ends first first."""
        with self._cond:
            return sorted(self.endpoints, key=lambda ep: ep.down_until)

    def stats(self) -> tuple[EndpointStats, ...]:
        with self._cond:
            now = self._clock()
            return tuple(
                EndpointStats(
                    url=ep.url,
                    state="healthy"
                    if ep.strikes == 0
                    else ("out" if now < ep.down_until else "trial"),
                    in_flight=ep.in_flight,
                    sent=ep.sent,
                    succeeded=ep.succeeded,
                    failed=ep.failed,
                    removals=ep.removals,
                    last_error=ep.last_error,
                    preferred=ep.url in self._preferred,
                )
                for ep in self.endpoints
            )

    def close(self) -> None:
        with self._cond:
            clients = [(ep.client, ep.pid) for ep in self.endpoints]
            for ep in self.endpoints:
                ep.client = None
        for client, pid in clients:
            if client is not None and pid == os.getpid():
                with contextlib.suppress(Exception):
                    client.close()
