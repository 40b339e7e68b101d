"""Shared fixtures. Expensive things (a real training run) are built once per
session; the session ends by proving that no TFF worker process is left."""

import json
import os
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
SMALL = ["--vocab_size=2000", "--model_dim=32", "--heads=2", "--ff_dim=64", "--max_client_examples=16",
         "--batch_size=8"]


def run_script(script, *args, timeout=600, env=None):
    """Runs scripts/<script> with piped output; returns CompletedProcess."""
    return subprocess.run([PY, os.path.join(ROOT, "scripts", script), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One DP run of the keyboard task as make run does it, but small: public
    pre-training, frozen embeddings, 3 DP rounds with Poisson sampling. No
    noise flag: private by default, at the task's default target ε."""
    out = str(tmp_path_factory.mktemp("run") / "kb")
    t = time.monotonic()
    p = run_script("train.py", "--task=keyboard", f"--output_dir={out}", "--rounds=3", "--clients_per_round=8",
                   "--delta=1e-5", "--eval_every=2", "--seed=1", "--public_pretrain_epochs=1",
                   "--freeze_layers=token_embedding,logits", *SMALL)
    assert p.returncode == 0, p.stderr[-3000:]
    return {"dir": out, "stdout": p.stdout, "stderr": p.stderr, "seconds": time.monotonic() - t}


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
    from tff_pipeline import runtime

    runtime.stop_workers()
