"""How long to wait before trying again, and how often: one policy for every retry loop.

The Triton client uses it for a request that found no server (failover, backoff, readiness
polls, endpoint cool-downs); the driver uses it between attempts of a failed step
(:data:`tierflow.engine.policy.RETRY`). Pure arithmetic: the random draw comes in as an
argument, so callers own their clocks and random sources.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """What a :class:`~tierflow.triton.client.TritonStageClient` does about :class:`~tierflow.errors.TritonUnavailable`.

    * **Failover.** The endpoint that failed is taken out of rotation for a cool-down,
      ``min(max_cooldown_s, cooldown_s * 2**(k-1))`` after its ``k``-th failure in a row,
      and the request goes to another endpoint at once, without a pause.
    * **Backoff and readiness.** When every endpoint is out, the request waits
      ``min(max_delay_s, base_delay_s * 2**(k-1))`` before retry ``k`` (1-based), shortened
      by up to ``jitter`` of itself at random so that many clients do not retry in
      lock-step, then polls the endpoints' ``is_model_ready`` and resends as soon as one
      says ready; a restarted server is used the moment its model is loaded. The wait
      ends in failure after ``ready_timeout_s``.
    * **Bound.** A request is sent at most ``max_attempts`` times in all, failovers included.

    >>> [RetryPolicy(5, 0.1, 0.5, jitter=0.0).delay_s(k) for k in range(1, 5)]
    [0.1, 0.2, 0.4, 0.5]
    >>> [RetryPolicy(cooldown_s=1.0, max_cooldown_s=30.0).cooldown_for(k) for k in (1, 2, 6)]
    [1.0, 2.0, 30.0]

    Attributes:
        max_attempts: Sends per request, the first included (1 = never retry).
        base_delay_s: Backoff before the first retry when no endpoint is in rotation.
        max_delay_s: Cap on any single backoff.
        jitter: Fraction of each backoff drawn at random, in ``[0, 1]``.
        ready_timeout_s: Longest wait, per retry, for some endpoint to report the model ready
            while every endpoint is out of rotation; 0 = do not poll, resend after the backoff.
        cooldown_s: Time out of rotation after an endpoint's first failure.
        max_cooldown_s: Cap on the cool-down.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    jitter: float = 0.5
    ready_timeout_s: float = 60.0
    cooldown_s: float = 1.0
    max_cooldown_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < self.base_delay_s:
            raise ValueError(
                "need 0 <= base_delay_s <= max_delay_s, "
                f"got {self.base_delay_s}, {self.max_delay_s}"
            )
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"jitter must be in [0, 1], got {self.jitter}")
        if self.ready_timeout_s < 0:
            raise ValueError(f"ready_timeout_s must be >= 0, got {self.ready_timeout_s}")
        if self.cooldown_s < 0 or self.max_cooldown_s < self.cooldown_s:
            raise ValueError(
                "need 0 <= cooldown_s <= max_cooldown_s, "
                f"got {self.cooldown_s}, {self.max_cooldown_s}"
            )

    def delay_s(self, retry: int, u: float = 0.0) -> float:
        """Seconds to wait before retry number ``retry`` (1-based), given ``u`` in [0, 1)."""
        capped = min(self.max_delay_s, self.base_delay_s * 2.0 ** (retry - 1))
        return capped * (1.0 - self.jitter * u)

    def cooldown_for(self, strikes: int) -> float:
        """Seconds out of rotation after an endpoint's ``strikes``-th failure in a row."""
        return min(self.max_cooldown_s, self.cooldown_s * 2.0 ** (strikes - 1))
