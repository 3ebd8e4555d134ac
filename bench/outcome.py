"""A cell's outcome decided by every process together, so all ranks record it and move on as one.

A rank that fails alone (out of memory on one GPU) leaves its peers blocked in a collective until
the process group's timeout; before this, rank 0 recorded the gloo timeout, not the cause, and the
group stayed out of step for the next cell. Here each rank reports (failed, reason) through the
group's store, every rank takes the same verdict (the cause first, named by rank), and after any
failure the group is rebuilt so the next cell starts in step.
"""

from __future__ import annotations

import re
from typing import Any

from ganlib.distributed import collective_timeout, exchange_objects, regroup
from ganlib.pretrain import lock_timeout

HARNESS_TIMEOUT_S = 600.0  # default collective timeout under bench, s (torch's own is 30 min); $GANBENCH_COLLECTIVE_TIMEOUT_S
# How a collective fails when a peer never joined it (gloo, NCCL's watchdog, a peer that exited):
# a consequence, so a rank's own error is named before it.
_WAITED_IN_VAIN = re.compile(r"Timed out waiting|collective operation timeout|DistBackendError|DistNetworkError|"
                             r"Connection (reset|closed) by peer")


def harness_timeout() -> float:
    """The collective timeout bench runs with, s."""
    return collective_timeout(HARNESS_TIMEOUT_S)


def source_lock_timeout(num_processes: int) -> float:
    """How long a cell waits for another job's pretraining of its source, s: below the collective
    timeout when other ranks wait in a broadcast meanwhile (the lock holder is then the recorded reason)."""
    return lock_timeout() if num_processes == 1 else min(lock_timeout(), 0.9 * harness_timeout())


def verdict(outcomes: list[dict[str, Any] | None], waited_s: float) -> str | None:
    """The one reason every rank records, from each rank's outcome (None: all ok).

    A rank's own error comes before the timeouts it caused in its peers; a rank that reported
    nothing at all (it died, or hangs outside any collective) is named with the wait.
    """
    causes, timeouts = [], []
    for rank, outcome in enumerate(outcomes):
        if outcome is None:
            causes.append(f"rank {rank}: no outcome within {waited_s:.0f} s (process dead or hung)")
        elif outcome["failed"]:
            reason = f"rank {rank}: {outcome['reason']}"
            (timeouts if _WAITED_IN_VAIN.search(outcome["reason"] or "") else causes).append(reason)
    if not causes and not timeouts:
        return None
    if causes and timeouts:
        return f"{causes[0]} (then {timeouts[0]})" if len(timeouts) == 1 else \
            f"{causes[0]} (then {len(timeouts)} ranks timed out waiting)"
    return (causes or timeouts)[0]


def agree(accelerator, record: dict[str, Any]) -> dict[str, Any]:
    """`record` with the outcome all ranks agree on; call on every process after each cell.

    An ok record stays as it is unless another rank failed: then it becomes the same failed record
    (no metrics, the common reason) on every rank.
    """
    if accelerator.num_processes == 1:
        return record
    timeout_s = harness_timeout()
    waited_s = 2 * timeout_s + 30  # a peer may sit out one full collective timeout before it reports
    mine = {"failed": record["status"] == "failed", "reason": record.get("reason")}
    reason = verdict(exchange_objects(accelerator, mine, waited_s), waited_s)
    if reason is None:
        return record
    # every rank says it (a cluster job's per-rank logs show each one moved on, and why)
    print(f"[bench] rank {accelerator.process_index} agreed: failed: {reason}", flush=True)
    regroup(accelerator, timeout_s)
    if record["status"] != "failed":
        record.update(metrics={"timing/wall_s": record["metrics"].get("timing/wall_s")}, curves={},
                      artifacts={k: v for k, v in record["artifacts"].items() if k in ("dir", "log")})
    record.update(status="failed", reason=reason)
    return record
