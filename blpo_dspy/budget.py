"""Call and token accounting per role (verbalizer, judge, proposer) and call budgets.

Usage is measured per call with ``dspy.track_usage()`` inside the calling thread (DSPy's tracker does not cross
``Evaluate``/``Parallel`` worker threads), so the counts are exact under any ``num_threads``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ROLES: tuple[str, ...] = ("verbalizer", "judge", "proposer")
TOTAL = "total"


class BudgetExhaustedError(RuntimeError):
    """A call budget was reached; the search stops with the best program so far."""


@dataclass
class RoleUsage:
    """Counters of one role.

    Attributes:
        calls: LM calls actually made (cache and journal hits excluded).
        replayed: Calls finished by an earlier attempt of this run and replayed from its journal on resume (they
            count toward the budget, so a resumed run stops where an uninterrupted one would).
        cache_hits: Results served from a cache (for example verbalizations shared with another compile).
        failures: Calls that failed or returned an unparseable answer (scored as failures).
        prompt_tokens: Prompt tokens reported by the LM.
        completion_tokens: Completion tokens reported by the LM.
        seconds: Wall time spent in this role's LM calls (summed over threads).
        replayed_tokens: Prompt + completion tokens of the replayed calls, as the LM reported them when the earlier
            attempt made them (journal entries written before tokens were journaled count 0).
    """

    calls: int = 0
    replayed: int = 0
    cache_hits: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    replayed_tokens: int = 0


class UsageLedger:
    """Thread-safe per-role counters with optional call caps.

    Args:
        max_calls: ``None`` (no cap), an int (cap on the total), or a mapping role -> cap (``"total"`` allowed).
    """

    def __init__(self, max_calls: int | Mapping[str, int] | None = None) -> None:
        self.caps = normalise_caps(max_calls)
        self.roles: dict[str, RoleUsage] = {role: RoleUsage() for role in ROLES}
        self.exhausted_role: str | None = None
        self._lock = threading.Lock()

    @property
    def exhausted(self) -> bool:
        """Whether a cap was hit."""
        return self.exhausted_role is not None

    @property
    def total_calls(self) -> int:
        """Calls charged to the budget over all roles (made now or replayed from an earlier attempt)."""
        return sum(u.calls + u.replayed for u in self.roles.values())

    def acquire(self, role: str, *, replay: bool = False) -> bool:
        """Charge one call of ``role`` to the budget.

        Args:
            role: ``verbalizer``, ``judge`` or ``proposer``.
            replay: The result comes from this run's journal (an earlier attempt made the call).

        Returns:
            ``False`` (and the ledger marked exhausted) when a cap forbids the call.
        """
        with self._lock:
            if self.exhausted_role is not None:
                return False
            usage = self.roles[role]
            cap = self.caps.get(role)
            if cap is not None and usage.calls + usage.replayed >= cap:
                self.exhausted_role = role
                return False
            total_cap = self.caps.get(TOTAL)
            if total_cap is not None and self.total_calls >= total_cap:
                self.exhausted_role = TOTAL
                return False
            if replay:
                usage.replayed += 1
            else:
                usage.calls += 1
            return True

    def record_tokens(self, role: str, usage: Mapping[str, Any]) -> int:
        """Add the token counts of one call (a DSPy usage dict, summed over models); return its prompt + completion
        tokens (journaled with the call, so a resumed run can count them as replayed)."""
        prompt = completion = 0
        for entry in usage.values():
            if isinstance(entry, Mapping):
                prompt += int(entry.get("prompt_tokens") or 0)
                completion += int(entry.get("completion_tokens") or 0)
        with self._lock:
            self.roles[role].prompt_tokens += prompt
            self.roles[role].completion_tokens += completion
        return prompt + completion

    def record_replayed_tokens(self, role: str, tokens: Any) -> None:
        """Add the journaled token count of one replayed call (anything but a non-negative int counts 0)."""
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens > 0:
            with self._lock:
                self.roles[role].replayed_tokens += tokens

    def record_time(self, role: str, seconds: float) -> None:
        """Add the wall time of one call."""
        with self._lock:
            self.roles[role].seconds += seconds

    def record_hit(self, role: str) -> None:
        """Count a result served from a cache or the journal."""
        with self._lock:
            self.roles[role].cache_hits += 1

    def record_failure(self, role: str) -> None:
        """Count a failed or unparseable call."""
        with self._lock:
            self.roles[role].failures += 1

    def to_dict(self) -> dict[str, dict[str, int]]:
        """JSON-ready counters per role plus a ``total`` row."""
        out = {role: asdict(usage) for role, usage in self.roles.items()}
        out[TOTAL] = {k: sum(u[k] for u in out.values()) for k in asdict(RoleUsage())}
        for usage in out.values():
            usage["seconds"] = round(usage["seconds"], 3)
        return out


def normalise_caps(max_calls: int | Mapping[str, int] | None) -> dict[str, int]:
    """Validate ``max_calls`` into ``{role_or_total: cap}``.

    Raises:
        ValueError: Unknown role or a negative cap.
    """
    if max_calls is None:
        return {}
    if isinstance(max_calls, bool) or not isinstance(max_calls, int | Mapping):
        raise ValueError(f"max_calls must be an int, a mapping of role -> int, or None; got {max_calls!r}")
    caps = {TOTAL: max_calls} if isinstance(max_calls, int) else dict(max_calls)
    for role, cap in caps.items():
        if role not in (*ROLES, TOTAL):
            raise ValueError(f"max_calls: unknown role {role!r} (roles: {', '.join((*ROLES, TOTAL))})")
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
            raise ValueError(f"max_calls[{role!r}] must be a non-negative int, got {cap!r}")
    return caps
