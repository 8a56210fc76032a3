"""Call budgets and usage accounting per role."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import pytest

from blpo_dspy.budget import ROLES, TOTAL, BudgetExhaustedError, RoleUsage, UsageLedger, normalise_caps


# --------------------------------------------------------------------------------------------- caps
def test_normalise_caps_accepts_none_int_and_mapping() -> None:
    assert normalise_caps(None) == {}
    assert normalise_caps(12) == {TOTAL: 12}
    assert normalise_caps(0) == {TOTAL: 0}
    caps = {"judge": 5, "proposer": 2, TOTAL: 20}
    assert normalise_caps(caps) == caps
    assert normalise_caps(caps) is not caps


@pytest.mark.parametrize(
    ("max_calls", "message"),
    [
        ({"critic": 3}, "unknown role 'critic'"),
        ({"judge": -1}, "max_calls['judge'] must be a non-negative int, got -1"),
        ({"judge": 2.5}, "max_calls['judge'] must be a non-negative int, got 2.5"),
        ({"verbalizer": True}, "max_calls['verbalizer'] must be a non-negative int, got True"),
        ({"total": "10"}, "max_calls['total'] must be a non-negative int"),
        (True, "max_calls must be an int, a mapping"),
        (3.0, "max_calls must be an int, a mapping"),
        ("10", "max_calls must be an int, a mapping"),
        (-5, "max_calls['total'] must be a non-negative int, got -5"),
    ],
)
def test_normalise_caps_errors(max_calls: Any, message: str) -> None:
    with pytest.raises(ValueError) as err:
        normalise_caps(max_calls)
    assert message in str(err.value)
    with pytest.raises(ValueError):
        UsageLedger(max_calls)


def test_budget_exhausted_is_a_runtime_error() -> None:
    assert issubclass(BudgetExhaustedError, RuntimeError)


# --------------------------------------------------------------------------------------------- acquire
def test_no_cap_grants_everything() -> None:
    ledger = UsageLedger()
    assert all(ledger.acquire(role) for role in ROLES for _ in range(50))
    assert ledger.total_calls == 150
    assert not ledger.exhausted
    assert ledger.exhausted_role is None


def test_role_cap_stops_that_role_and_then_the_whole_search() -> None:
    ledger = UsageLedger({"judge": 3})
    assert [ledger.acquire("judge") for _ in range(3)] == [True, True, True]
    assert ledger.acquire("verbalizer")
    assert not ledger.exhausted
    assert ledger.acquire("judge") is False
    assert ledger.exhausted
    assert ledger.exhausted_role == "judge"
    assert ledger.acquire("verbalizer") is False  # once exhausted, the search stops for every role
    assert ledger.acquire("proposer", replay=True) is False
    assert ledger.roles["judge"].calls == 3
    assert ledger.roles["verbalizer"].calls == 1
    assert ledger.total_calls == 4


def test_total_cap_counts_every_role() -> None:
    ledger = UsageLedger(5)
    granted = [ledger.acquire(role) for role in ("verbalizer", "judge", "proposer", "judge", "judge", "verbalizer")]
    assert granted == [True, True, True, True, True, False]
    assert ledger.exhausted_role == TOTAL
    assert ledger.total_calls == 5


def test_zero_cap_grants_nothing() -> None:
    ledger = UsageLedger({"proposer": 0})
    assert ledger.acquire("proposer") is False
    assert ledger.exhausted_role == "proposer"
    assert ledger.total_calls == 0


def test_replayed_calls_count_toward_caps_but_not_as_calls() -> None:
    ledger = UsageLedger({"judge": 4, TOTAL: 6})
    assert ledger.acquire("judge", replay=True)
    assert ledger.acquire("judge", replay=True)
    assert ledger.acquire("judge")
    usage = ledger.roles["judge"]
    assert (usage.calls, usage.replayed) == (1, 2)
    assert ledger.total_calls == 3
    assert ledger.acquire("judge")
    assert ledger.acquire("judge", replay=True) is False  # 4 charged: 2 replayed + 2 made
    assert ledger.exhausted_role == "judge"


def test_replay_and_fresh_calls_reach_the_total_cap_alike() -> None:
    resumed, uninterrupted = UsageLedger(4), UsageLedger(4)
    assert [resumed.acquire("judge", replay=i < 3) for i in range(6)] == [True] * 4 + [False] * 2
    assert [uninterrupted.acquire("judge") for _ in range(6)] == [True] * 4 + [False] * 2
    assert resumed.total_calls == uninterrupted.total_calls == 4


# --------------------------------------------------------------------------------------------- counters
def test_tokens_hits_failures_and_to_dict() -> None:
    ledger = UsageLedger()
    usage: Mapping[str, Any] = {
        "scripted/vlm": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        "scripted/other": {"prompt_tokens": 5, "completion_tokens": None},
        "not-a-model-entry": 7,
    }
    assert ledger.record_tokens("verbalizer", usage) == 125  # the call's prompt + completion tokens, for the journal
    assert ledger.record_tokens("verbalizer", {"m": {"prompt_tokens": 1, "completion_tokens": 2}}) == 3
    assert ledger.record_tokens("judge", {}) == 0
    ledger.record_hit("verbalizer")
    ledger.record_hit("verbalizer")
    ledger.record_failure("judge")
    ledger.acquire("judge")
    ledger.acquire("proposer", replay=True)
    ledger.record_replayed_tokens("proposer", 40)
    for not_a_count in (None, -5, True, "12", 1.5):  # an old or damaged journal entry counts 0
        ledger.record_replayed_tokens("proposer", not_a_count)
    ledger.record_time("judge", 0.25)
    ledger.record_time("judge", 1 / 3)
    ledger.record_time("proposer", 2.0)

    report = ledger.to_dict()
    assert report["verbalizer"] == {
        "calls": 0,
        "replayed": 0,
        "cache_hits": 2,
        "failures": 0,
        "prompt_tokens": 106,
        "completion_tokens": 22,
        "seconds": 0.0,
        "replayed_tokens": 0,
    }
    assert report["judge"] == {**vars(RoleUsage()), "calls": 1, "failures": 1, "seconds": 0.583}
    assert report["proposer"] == {**vars(RoleUsage()), "replayed": 1, "replayed_tokens": 40, "seconds": 2.0}
    assert report[TOTAL] == {
        "calls": 1,
        "replayed": 1,
        "cache_hits": 2,
        "failures": 1,
        "prompt_tokens": 106,
        "completion_tokens": 22,
        "seconds": 2.583,
        "replayed_tokens": 40,
    }
    assert ledger.roles["judge"].seconds == pytest.approx(0.25 + 1 / 3)  # rounded only in the report
    assert set(report) == {*ROLES, TOTAL}


# --------------------------------------------------------------------------------------------- contention
@pytest.mark.parametrize(("caps", "cap"), [(250, 250), ({"judge": 137}, 137)])
def test_exactly_cap_calls_are_granted_under_contention(caps: int | dict[str, int], cap: int) -> None:
    ledger = UsageLedger(caps)
    threads_n, attempts = 8, 100
    barrier = threading.Barrier(threads_n)
    granted = [0] * threads_n

    def work(worker: int) -> None:
        barrier.wait()
        for i in range(attempts):
            if ledger.acquire("judge", replay=(i % 3 == 0)):
                granted[worker] += 1

    threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(granted) == cap
    assert ledger.total_calls == cap
    usage = ledger.roles["judge"]
    assert usage.calls + usage.replayed == cap
    assert ledger.exhausted


def test_counters_are_exact_under_contention() -> None:
    ledger = UsageLedger()
    barrier = threading.Barrier(6)

    def work() -> None:
        barrier.wait()
        for _ in range(500):
            ledger.record_tokens("proposer", {"m": {"prompt_tokens": 2, "completion_tokens": 1}})
            ledger.record_hit("verbalizer")
            ledger.record_failure("judge")
            ledger.acquire("proposer")
            ledger.record_time("judge", 0.5)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report = ledger.to_dict()
    assert report["proposer"]["prompt_tokens"] == 6000
    assert report["proposer"]["completion_tokens"] == 3000
    assert report["proposer"]["calls"] == 3000
    assert report["verbalizer"]["cache_hits"] == 3000
    assert report["judge"]["failures"] == 3000
    assert report["judge"]["seconds"] == 1500.0
