"""bench/outcome.py: the one reason every rank records for a cell (the 2-process runs that use it
end to end are in test_bench_run.py: a failure on one rank only, a failed cell under the user's launch)."""

from __future__ import annotations

import pytest

from bench.outcome import harness_timeout, verdict
from ganlib.distributed import TIMEOUT_ENV
from ganlib.errors import UserError

GLOO_TIMEOUT = ("RuntimeError: [../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                "8000ms for recv operation to complete (at distributed_c10d.py:3913)")
OOM = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
ok = {"failed": False, "reason": None}


def test_all_ok_is_no_verdict():
    assert verdict([ok, ok], 60) is None


def test_the_failing_rank_is_named_before_the_timeout_it_caused():
    reason = verdict([{"failed": True, "reason": GLOO_TIMEOUT}, {"failed": True, "reason": OOM}], 60)
    assert reason.startswith(f"rank 1: {OOM} (then rank 0: RuntimeError")


def test_a_failure_on_one_rank_fails_the_cell_for_all():
    assert verdict([ok, {"failed": True, "reason": OOM}, ok], 60) == f"rank 1: {OOM}"


def test_only_timeouts_name_the_first():
    reason = verdict([{"failed": True, "reason": GLOO_TIMEOUT}, {"failed": True, "reason": GLOO_TIMEOUT}], 60)
    assert reason == f"rank 0: {GLOO_TIMEOUT}"


def test_a_rank_that_never_reported_is_named_with_the_wait():
    reason = verdict([{"failed": True, "reason": GLOO_TIMEOUT}, None], 1230)
    assert reason.startswith("rank 1: no outcome within 1230 s")


def test_several_timed_out_peers_are_counted():
    timeout = {"failed": True, "reason": GLOO_TIMEOUT}
    reason = verdict([timeout, timeout, {"failed": True, "reason": OOM}, timeout], 60)
    assert reason == f"rank 2: {OOM} (then 3 ranks timed out waiting)"


def test_the_harness_timeout_is_short_by_default_and_set_by_the_environment(monkeypatch):
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert 0 < harness_timeout() < 30 * 60  # torch's own 30 minutes is what hung every rank
    monkeypatch.setenv(TIMEOUT_ENV, "7.5")
    assert harness_timeout() == 7.5
    for bad in ("soon", "0", "-3", "nan"):
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=TIMEOUT_ENV):
            harness_timeout()
