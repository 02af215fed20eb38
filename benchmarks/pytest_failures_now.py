"""A pytest plugin for runs that may be cut off (the GPU machine's time limit): each failure's
report goes to $OUT/failures.txt (or failures.txt here) when it happens, not at the end.

    PYTHONPATH=benchmarks pytest -p pytest_failures_now ...
"""

import os


def pytest_runtest_logreport(report):
    if report.failed:
        path = os.path.join(os.environ.get("OUT", "."), "failures.txt")
        with open(path, "a") as f:
            f.write(f"==== {report.nodeid} ({report.when})\n{report.longreprtext[-6000:]}\n")
