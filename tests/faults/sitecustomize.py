"""Run by every Python process that tests start (tests/conftest.py puts this folder on PYTHONPATH):
with GANBENCH_FAULT set, `bench run`'s workers get the test's injected failures (ganbench_faults)."""

import os

if os.environ.get("GANBENCH_FAULT"):
    import ganbench_faults

    ganbench_faults.arm()
