"""A run directory that survives crashes: a lock, a privacy ledger and
atomic checkpoints of the full training state.

* ``RunLock``: one process per run directory (``fcntl.flock`` on
  ``.lock``; the kernel drops it when the process dies, even by SIGKILL).
* ``Ledger``: ``ledger.jsonl``, one line per round attempt (round, attempt,
  the round's serialised DpEvent, and what else the mechanism composes by,
  e.g. DP-FTRL's tree), appended and fsync'ed before the round runs. ε is the
  mechanism's composition of the lines (``Mechanism.compose``), so a round
  that ran, was shown and was then lost in a crash is still counted when it
  is run again: ε never counts fewer rounds than were released. It holds
  nothing computed from the data.
* ``Participation``: ``operator/participation.jsonl``, which clients took
  part in each round and attempt: operator-only (with secret sampling it is
  the secret that amplification relies on); the audit reads it.
* Checkpoints: ``checkpoints/ckpt-NNNNNN/`` holds ``state.npz`` (every leaf of
  the TFF learning-process state: model and optimizer, and the aggregator
  state with the adaptive clip) and ``meta.json`` (round, ledger length,
  metrics so far). Written into a temporary directory, fsync'ed, then
  renamed: a crash or a full disk leaves the previous checkpoint, never a
  half-written one. The newest ``keep`` are kept.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import os
import re
import shutil
from typing import Any, Optional

import numpy as np

from tff_pipeline.config import ConfigError

CKPT_RE = re.compile(r"^ckpt-(\d{6})$")


class CheckpointError(ConfigError):
    """A checkpoint could not be written or read; the message says what is
    intact and how to go on."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunLock:
    """Exclusive lock on a run directory for the life of this process."""

    def __init__(self, run_dir: str):
        import fcntl

        self.path = os.path.join(run_dir, ".lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            other = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ConfigError(f"--output_dir={run_dir} is in use by another run (pid {other}); wait for it to "
                              f"finish or choose another --output_dir") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


class Ledger:
    """Append-only record of round results (see the module docstring)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "ledger.jsonl")
        self.entries: list[dict[str, Any]] = []
        if os.path.exists(self.path):
            _end_torn_line(self.path)
            with open(self.path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        self.entries.append(json.loads(line))
                    except json.JSONDecodeError:
                        # A torn last line (crash mid-append) is still a round
                        # that may have been released: count it.
                        self.entries.append({"round": None, "torn": True})
        self._per_round = collections.Counter(e.get("round") for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def attempts(self, round_num: int) -> int:
        """How many results of this round were recorded before. A torn line
        (its round unknown) counts for every round, so a round re-run after it
        never reuses an attempt number (a public sampling seed would otherwise
        draw the same cohort again)."""
        return self._per_round[round_num] + self._per_round[None]

    def append(self, round_num: int, fields: dict) -> None:
        """Records one round before it runs: ``fields`` is the mechanism's ledger entry (its "event" is
        ``event_to_json`` of the round's DpEvent)."""
        entry = {"round": round_num, "attempt": self.attempts(round_num), **fields}
        try:
            append_line(self.path, json.dumps(entry))
        except OSError as e:
            raise CheckpointError(f"cannot record round {round_num} in the privacy ledger {self.path} "
                                  f"({e.strerror}); the round was not run. Free space (or fix "
                                  f"permissions) and re-run the same command to resume") from None
        self.entries.append(entry)
        self._per_round[round_num] += 1


def append_line(path: str, line: str, mode: int = 0o644) -> None:
    """Appends one line and fsyncs it. A short write (a nearly full disk) raises OSError, so the caller never
    goes on as if the line were there."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, mode)
    try:
        done = 0
        while done < len(data):
            n = os.write(fd, data[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, "short write")
            done += n
        os.fsync(fd)
    finally:
        os.close(fd)


def _end_torn_line(path: str) -> None:
    """A crash mid-append leaves a last line without its newline: end it, so that it stays a line of its own
    (counted as a round) and the next line is not glued onto it; the count in memory and on disk then agree."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
    append_line(path, "")


class Participation:
    """Operator-only record of the cohorts: one line per round result."""

    def __init__(self, path: str):
        self.path = path

    def append(self, round_num: int, attempt: int, clients) -> None:
        try:
            append_line(self.path, json.dumps({"round": round_num, "attempt": attempt,
                                               "clients": [int(c) for c in clients]}), mode=0o600)
        except OSError as e:
            raise CheckpointError(f"cannot record the cohort of round {round_num} in {self.path} ({e.strerror}); "
                                  f"the round is in the privacy ledger. Free space and re-run the same command "
                                  f"to resume") from None

    def rows(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a torn last line: that round's cohort is unknown
        return out

    def clients(self) -> np.ndarray:
        """Every client that took part in at least one round result, re-run attempts included."""
        ids = [c for r in self.rows() for c in r["clients"]]
        return np.unique(np.asarray(ids, dtype=np.int64))

    def max_per_client(self) -> int:
        """The most round results any one client took part in."""
        counts = collections.Counter(c for r in self.rows() for c in r["clients"])
        return max(counts.values(), default=0)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def list_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints (those with meta.json), oldest first."""
    d = checkpoint_dir(run_dir)
    if not os.path.isdir(d):
        return []
    out = []
    for name in os.listdir(d):
        m = CKPT_RE.match(name)
        if m and os.path.exists(os.path.join(d, name, "meta.json")):
            out.append((int(m.group(1)), os.path.join(d, name)))
    return sorted(out)


def latest(run_dir: str) -> Optional[tuple[int, str]]:
    c = list_checkpoints(run_dir)
    return c[-1] if c else None


def save(run_dir: str, round_num: int, state, meta: dict[str, Any], keep: int) -> str:
    """Atomically writes the checkpoint of ``round_num``; keeps the newest
    ``keep``. On failure (e.g. a full disk) removes the partial files and
    raises CheckpointError; earlier checkpoints are untouched."""
    import tensorflow as tf

    d = checkpoint_dir(run_dir)
    final = os.path.join(d, f"ckpt-{round_num:06d}")
    tmp = os.path.join(d, f".tmp-ckpt-{round_num:06d}-{os.getpid()}")
    leaves = tf.nest.flatten(state)
    try:
        os.makedirs(d, mode=0o700, exist_ok=True)  # meta.json holds held-out metrics: operator-only
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        buf = io.BytesIO()  # built in memory: a failed disk write then leaves no half-closed zip behind
        np.savez(buf, **{f"leaf{i:05d}": np.asarray(x) for i, x in enumerate(leaves)})
        with open(os.path.join(tmp, "state.npz"), "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "round": round_num, "leaves": len(leaves)}, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # the same round checkpointed again (e.g. at a stop)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(d)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest(run_dir)
        kept = f"the checkpoint of round {prev[0]} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write the checkpoint of round {round_num} to {d} ({e.strerror}); {kept}. "
                              f"Free space and re-run the same command to resume") from None
    for _, path in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    return final


def load(path: str, template_state) -> tuple[Any, dict[str, Any]]:
    """The state saved at ``path``, in the structure of ``template_state``
    (a freshly initialised state of the same process), and its meta."""
    import tensorflow as tf

    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    template = tf.nest.flatten(template_state)
    # The model weights come first in the state and must match exactly. Other leaves may change length as
    # training goes (DP-FTRL's tree buffer holds one row per open tree level): same rank and trailing shape.
    n_model = len(tf.nest.flatten(template_state.global_model_weights)) if hasattr(
        template_state, "global_model_weights") else len(template)
    try:
        with np.load(os.path.join(path, "state.npz")) as z:
            leaves = [z[f"leaf{i:05d}"] for i in range(len(z.files))]
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable ({e}); delete it to resume from an earlier one")
    if len(leaves) != len(template) or not all(_fits(a, b, i < n_model) for i, (a, b) in
                                               enumerate(zip(leaves, template))):
        raise CheckpointError(f"checkpoint {path} does not match this model and process (different model or "
                              f"flags); resume with the run's original flags or use a new --output_dir")
    typed = [np.asarray(a, dtype=np.asarray(b).dtype)[()] for a, b in zip(leaves, template)]
    return tf.nest.pack_sequence_as(template_state, typed), meta


def _fits(saved, template, exact: bool) -> bool:
    a, b = np.shape(saved), np.shape(template)
    return a == b if exact or len(a) == 0 else (len(a) == len(b) and a[1:] == b[1:])
