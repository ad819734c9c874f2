import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # README runs the suite on two workers (pytest-xdist), each with two TVM threads: a pool
    # thread that spins while waiting only takes its time from the other worker
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")

# Most tests build small synthetic models that no committed record can match, and parsing
# the committed databases costs ~15 s per process (every CLI subprocess): by default the
# tests see an empty tuning_logs root. Tests marked `committed_tuning_logs` get the real one.
_USER_TUNING_LOGS = os.environ.get("TVM_REBIRTH_TUNING_LOGS")
_EMPTY_TUNING_LOGS = tempfile.mkdtemp(prefix="empty-tuning-logs-")
os.environ["TVM_REBIRTH_TUNING_LOGS"] = _EMPTY_TUNING_LOGS


def pytest_unconfigure(config):
    shutil.rmtree(_EMPTY_TUNING_LOGS, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "committed_tuning_logs: builds read the committed tuning_logs/ databases")
    config.addinivalue_line(
        "markers", "slow: the full correctness harness (TVM_REBIRTH_FULL_HARNESS=1 runs it)")
    config.addinivalue_line(
        "markers", "heavy: takes a minute or more; collected first (see below)")
    config.addinivalue_line(
        "markers", "xdist_group(name): with --dist loadgroup, the group runs on one worker, "
        "one test at a time ('rpc': trackers, RPC servers, emulated devices, tunes)")


def pytest_collection_modifyitems(config, items):
    """Heavy tests first. With README's `-n 2 --dist loadgroup`, one worker starts on the
    'rpc' group (the biggest scope, scheduled first) and the other on the heavy tests, and
    the many short tests fill in at the end, so neither worker finishes long before the
    other (the demo collected in its place started 20 minutes in and ran alone at the end)."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


@pytest.fixture(autouse=True)
def _committed_tuning_logs(request, monkeypatch):
    if request.node.get_closest_marker("committed_tuning_logs"):
        if _USER_TUNING_LOGS is None:
            monkeypatch.delenv("TVM_REBIRTH_TUNING_LOGS")
        else:
            monkeypatch.setenv("TVM_REBIRTH_TUNING_LOGS", _USER_TUNING_LOGS)
