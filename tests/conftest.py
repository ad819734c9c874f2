import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TVM_NUM_THREADS", "2")

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


@pytest.fixture(autouse=True)
def _committed_tuning_logs(request, monkeypatch):
    if request.node.get_closest_marker("committed_tuning_logs"):
        if _USER_TUNING_LOGS is None:
            monkeypatch.delenv("TVM_REBIRTH_TUNING_LOGS")
        else:
            monkeypatch.setenv("TVM_REBIRTH_TUNING_LOGS", _USER_TUNING_LOGS)
