"""Shared fixtures. Expensive things (a real training run) are built once per
session; the session ends by proving that no TFF worker process is left."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable

from tff_pipeline import runtime  # noqa: E402

# Every command this session starts (and its TFF worker) inherits this marker;
# workers of other runs on the machine are not this session's business.
import uuid  # noqa: E402

os.environ["TFF_PIPELINE_TEST_SESSION"] = uuid.uuid4().hex
MARKER = "TFF_PIPELINE_TEST_SESSION=" + os.environ["TFF_PIPELINE_TEST_SESSION"]


def session_workers():
    return set(runtime.live_worker_pids(MARKER))


WORKERS_AT_START = frozenset(session_workers())

# A small but real configuration: real Shakespeare clients, a small model.
# No model.tflite (its conversion and check cost about 4 s a run): the shared trained_run makes and tests one.
SMALL = ["--vocab_size=2000", "--model_dim=32", "--heads=2", "--ff_dim=64", "--max_client_examples=16",
         "--batch_size=8", "--tflite=none"]


def children_workers(pid):
    """TFF worker_binary processes whose parent is pid."""
    out = []
    for w in runtime.live_worker_pids():
        try:
            with open(f"/proc/{w}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(w)
        except OSError:
            pass
    return out


def worker_alive(pid):
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_script(script, *args, timeout=600, env=None):
    """Runs scripts/<script> with piped output; returns CompletedProcess."""
    return subprocess.run([PY, os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def start_script(script, *args, env=None, sigint_default=False):
    """scripts/<script> started in the background with piped output; finish() waits for it. ``sigint_default``:
    the child starts with SIGINT at its default disposition, as under a terminal's Ctrl-C, whatever this process
    inherited (a `make test` started in the background by a shell without job control ignores SIGINT, and so
    would every child, which a Python script then never sees)."""
    reset = (lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) if sigint_default else None
    return subprocess.Popen([PY, os.path.join(ROOT, "scripts", script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                            preexec_fn=reset)


def finish(proc, timeout=600):
    """The CompletedProcess of a start_script() process (killed if it outlives timeout)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


_TRAIN_MAIN = []


def call_train(*args):
    """scripts/train.py's main called in this process, through the same wrapper (cli.call) that turns a user
    mistake into one ``error:`` line and exit code 2, with stdout and stderr captured: for error paths and for
    training runs that need no process of their own, which would otherwise pay a fresh process's TensorFlow and
    TFF imports (10-35 s) each. The local TFF worker it starts is reused by later calls. Returns a CompletedProcess like
    run_script; an exception that is not a user mistake propagates and fails the test."""
    import contextlib
    import io
    import runpy

    import tensorflow  # noqa: F401  (imported before absl parses flags, as cli.main does)
    from absl import flags

    from tff_pipeline import cli

    if not _TRAIN_MAIN:
        _TRAIN_MAIN.append(runpy.run_path(os.path.join(ROOT, "scripts", "train.py"), run_name="train_script")["main"])
    argv = [os.path.join(ROOT, "scripts", "train.py"), *args]
    out, err = io.StringIO(), io.StringIO()
    saved_argv, sys.argv = sys.argv, argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            flags.FLAGS.unparse_flags()
            try:
                rest = flags.FLAGS(argv)
            except flags.Error as e:  # what absl's app.run does with a flag it cannot parse
                print(f"FATAL Flags parsing error: {e}", file=sys.stderr)
                code = 1
            else:
                code = cli.call(_TRAIN_MAIN[0], rest)
    finally:
        sys.argv = saved_argv
        flags.FLAGS.unparse_flags()
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One DP run of the keyboard task as make run does it, but small: public
    pre-training, frozen embeddings, 3 DP rounds with Poisson sampling. No
    noise flag: private by default, at the task's default target ε."""
    out = str(tmp_path_factory.mktemp("run") / "kb")
    before = session_workers()
    t = time.monotonic()
    p = run_script("train.py", "--task=keyboard", f"--output_dir={out}", "--rounds=3", "--clients_per_round=8",
                   "--delta=1e-5", "--eval_every=2", "--seed=1", "--public_pretrain_epochs=1",
                   "--freeze_layers=token_embedding,logits", *SMALL, "--tflite=float16")
    assert p.returncode == 0, p.stderr[-3000:]
    return {"dir": out, "stdout": p.stdout, "stderr": p.stderr, "seconds": time.monotonic() - t,
            "workers_before": before, "workers_after": session_workers()}


@pytest.fixture(scope="session")
def keyboard_task():
    from tff_pipeline.config import make
    import tasks

    return tasks.build(make(vocab_size=2000, model_dim=32, heads=2, ff_dim=64, max_client_examples=16,
                                   batch_size=8))


def load_json(path):
    with open(path) as f:
        return json.load(f)


def pytest_sessionfinish(session, exitstatus):
    """At the end of the session (of each xdist worker), no TFF worker started by its commands may be alive: a
    leftover is named on stderr, killed, and fails the session where pytest lets a hook do so."""
    import signal

    from tff_pipeline import runtime

    runtime.stop_workers()
    left = sorted(session_workers() - WORKERS_AT_START)
    if left:
        print(f"\nerror: TFF worker(s) {left} of this test session outlived every command; killed now",
              file=sys.stderr)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under ``pytest -n 2 --dist loadgroup`` (make test), tests that share an expensive fixture of ours with a
    wider scope than one test (a session's trained run, a module's runs) are put in one group, so that one xdist
    worker builds it once; the other tests are spread over both workers."""
    parent = {}

    def find(k):
        while parent.setdefault(k, k) != k:
            k = parent[k]
        return k

    keys = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = []
        for name, defs in (info.name2fixturedefs.items() if info else ()):
            d = defs[-1]
            ours = getattr(d.func, "__module__", "").startswith(("conftest", "test_"))
            if ours and d.scope != "function":
                shared.append((name,) if d.scope == "session" else (name, item.module.__name__))
        if shared:
            keys[item] = shared[0]
            for k in shared[1:]:
                parent[find(k)] = find(shared[0])
    for item, k in keys.items():
        item.add_marker(pytest.mark.xdist_group("-".join(find(k))))


def pytest_configure(config):
    config.addinivalue_line("markers", "xdist_group(name): tests that one xdist worker runs (a shared fixture)")
