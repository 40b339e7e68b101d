"""No TFF worker_binary may outlive a command, even a piped or killed one."""

from tff_pipeline import runtime
from conftest import WORKERS_AT_START, session_workers


def test_piped_run_exits_and_leaves_no_worker(trained_run):
    # The session fixture ran scripts/train.py with stdout/stderr piped: it returned, so the pipes were closed,
    # and no worker of this session appeared during it and stayed. (A SIGKILLed run's worker:
    # tests/test_durability.py, the SIGKILL test.)
    assert trained_run["workers_after"] <= trained_run["workers_before"]
    assert "round    3/3" in trained_run["stdout"]  # progress went through the pipe


def test_no_worker_left_by_this_session():
    # Every command this process (this xdist worker) started before this test has ended and left no worker. Under
    # `make test` (xdist, loadgroup) it need not run last, so tests/conftest.py's pytest_sessionfinish checks the
    # same at the end of each worker's session (and kills and names any leftover).
    runtime.stop_workers()
    assert session_workers() <= WORKERS_AT_START
