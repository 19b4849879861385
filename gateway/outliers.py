"""Passive outlier detection, as Envoy's: failures in a row eject a target for an interval that
doubles with each ejection, up to a cap, and past ejections are forgotten after a long spell
without one. A zone's endpoint (gateway/upstreams.py) and each replica of a zone
(gateway/replicas.py) keep one `Outlier` each, under the topology's one policy."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config import RoutingConfig


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    consecutive_failures: int = 2
    base_ejection_s: float = 1.0
    max_ejection_s: float = 30.0

    @classmethod
    def of(cls, config: RoutingConfig) -> EjectionPolicy:
        return cls(config.consecutive_failures, config.base_ejection_s, config.max_ejection_s)


@dataclass(slots=True)
class Outlier:
    """One target's failure streak and ejections."""

    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record_success(self) -> None:
        """An answer: the streak ends (past ejections are forgotten by time, `eject`)."""
        self.consecutive_failures = 0

    def record_failure(self, policy: EjectionPolicy, now: float, *, at_once: bool = False, may_eject: bool = True) -> bool:
        """Count a failure; True when it ejects the target: at once (`at_once`, a process gone) or
        at the policy's streak, unless `may_eject` says the target must stay (the last one left)."""
        self.consecutive_failures += 1
        if not may_eject or (not at_once and self.consecutive_failures < policy.consecutive_failures):
            return False
        self.eject(policy, now)
        return True

    def eject(self, policy: EjectionPolicy, now: float) -> float:
        """Eject for base x 2^(ejections before), capped; returns the interval."""
        if self.ejections and now - self.ejected_until > policy.max_ejection_s:
            self.ejections = 0  # well for a long while: a fresh start
        self.ejections += 1
        interval = min(policy.max_ejection_s, policy.base_ejection_s * 2 ** (self.ejections - 1))
        self.ejected_until = now + interval
        self.consecutive_failures = 0
        return interval


DEFAULT_POLICY = EjectionPolicy()
