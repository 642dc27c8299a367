"""Admission policies by name, for `Engine(scheduler=...)`."""

from __future__ import annotations

from .admission import AdmissionPolicy, AggressivePolicy, ConservativePolicy
from .past_future import PastFuturePolicy

POLICIES = {"past_future": PastFuturePolicy, "conservative": ConservativePolicy, "aggressive": AggressivePolicy}


def make_policy(scheduler: str | AdmissionPolicy) -> AdmissionPolicy:
    """A fresh policy for a name, or the policy object given (to set its knobs)."""
    if not isinstance(scheduler, str):
        return scheduler
    if scheduler not in POLICIES:
        raise ValueError(f"scheduler={scheduler!r} is unknown: choose one of {sorted(POLICIES)}, "
                         "or pass a policy object such as PastFuturePolicy(window=500, samples=8)")
    return POLICIES[scheduler]()
