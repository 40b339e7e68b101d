"""No TFF worker_binary may outlive a command, even a piped or killed one."""

import os
import signal
import subprocess
import sys
import time

from tff_pipeline import runtime
from conftest import ROOT, SMALL, WORKERS_AT_START, run_script, session_workers


def _children_workers(pid):
    out = []
    for w in runtime.live_worker_pids():
        try:
            with open(f"/proc/{w}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(w)
        except OSError:
            pass
    return out


def test_piped_run_exits_and_leaves_no_worker(trained_run):
    # The session fixture ran scripts/train.py with stdout/stderr piped: it returned,
    # so the pipes were closed. No worker may remain from it or any other command.
    before = session_workers()
    p = run_script("train.py", "--output_dir=" + os.path.join(os.path.dirname(trained_run["dir"]), "tiny"),
                   "--rounds=1", "--clients_per_round=4", "--noise_multiplier=0", *SMALL, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert session_workers() <= before
    assert "round    1/1" in p.stdout  # progress went through the pipe


def test_sigkill_of_python_kills_its_worker(tmp_path):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "train.py"),
                             f"--output_dir={tmp_path / 'k'}", "--rounds=50", "--clients_per_round=4",
                             "--noise_multiplier=0", *SMALL], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    workers = []
    while time.monotonic() < deadline and not workers:
        time.sleep(0.5)
        workers = _children_workers(proc.pid)
    assert workers, "the run never started a TFF worker"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{w}") and not _zombie(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}") and not _zombie(w)]


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_no_worker_left_by_this_session():
    # Runs last (file order): every command the session started has ended.
    runtime.stop_workers()
    assert session_workers() <= WORKERS_AT_START
