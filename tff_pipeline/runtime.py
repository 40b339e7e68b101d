"""TFF execution context whose worker process can never outlive Python.

TFF 0.87's default context starts ``tensorflow_federated/data/worker_binary``
with the parent's stdout/stderr and stops it only in ``ServiceManager.__del__``,
which does not run at interpreter exit: the worker is re-parented to PID 1 and
keeps the pipes open, so a piped run never ends. Here the worker:

* writes to its own log file, never to our stdout/stderr;
* gets a Linux parent-death signal (``PR_SET_PDEATHSIG``), so the kernel kills
  it when this process dies, even by SIGKILL;
* is stopped at exit (SIGINT, wait, then SIGKILL) by an ``atexit`` hook and by
  :func:`stop_workers`.

Only this module imports TFF's executor internals.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Optional, Sequence

_PR_SET_PDEATHSIG = 1
_GRPC_OPTIONS = [
    ("grpc.max_message_length", 2_000_000_000),
    ("grpc.max_receive_message_length", 2_000_000_000),
    ("grpc.max_send_message_length", 2_000_000_000),
]

_lock = threading.Lock()
_processes: list[subprocess.Popen] = []


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def worker_binary_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("tensorflow_federated")
    root = os.path.dirname(spec.origin)
    path = os.path.join(root, "data", "worker_binary")
    if not os.path.isfile(path):
        raise RuntimeError(f"TFF worker binary not found at {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(port: Optional[int] = None, log_path: Optional[str] = None) -> tuple[subprocess.Popen, int]:
    """Starts one TFF worker service on localhost; returns (process, port).

    The process is tracked and stopped by :func:`stop_workers` / at exit.
    """
    port = port or _free_port()
    if log_path is None:
        log_dir = os.environ.get("TFF_PIPELINE_WORKER_LOG_DIR", tempfile.gettempdir())
        log_path = os.path.join(log_dir, f"tff_worker_{os.getpid()}_{port}.log")
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [worker_binary_path(), f"--port={port}", "--max_concurrent_computation_calls=-1"],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_set_pdeathsig,
        close_fds=True,
    )
    log.close()
    with _lock:
        _processes.append(proc)
    return proc, port


def stop_workers(timeout: float = 5.0) -> None:
    """Stops every worker this process started (SIGINT, wait, then SIGKILL)."""
    global _installed
    with _lock:
        procs = list(_processes)
        _processes.clear()
    if procs and _installed == ():  # the local worker the installed context runs on is going: install anew next time
        _installed = None
    for p in procs:
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


atexit.register(stop_workers)


def _executor_factory(target: str, ready_timeout: float = 20.0, tls=None):
    """A TFF executor factory over the running worker service at ``target`` (over mutual TLS with ``tls``, a
    tff_pipeline.tls.ClientTls)."""
    import grpc
    from tensorflow_federated.python.core.impl.executor_stacks import python_executor_stacks
    from tensorflow_federated.python.core.impl.executors import remote_executor
    from tensorflow_federated.python.core.impl.executors import remote_executor_grpc_stub
    from tensorflow_federated.python.core.impl.types import placements

    channel = (grpc.secure_channel(target, tls.grpc_credentials(), _GRPC_OPTIONS) if tls is not None else
               grpc.insecure_channel(target, _GRPC_OPTIONS))
    stub = remote_executor_grpc_stub.RemoteExecutorGrpcStub(channel)
    deadline = time.monotonic() + ready_timeout
    while not stub.is_ready:
        if time.monotonic() > deadline:
            raise _no_worker(target, f"within {ready_timeout:.0f} s")
        time.sleep(0.05)

    def stack_fn(cardinalities):
        if cardinalities.get(placements.CLIENTS) is None:
            cardinalities[placements.CLIENTS] = 0
        ex = remote_executor.RemoteExecutor(stub)
        ex.set_cardinalities(cardinalities)
        return ex

    return python_executor_stacks.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


def check_reachable(workers: Sequence[str], timeout: float = 5.0, tls=None) -> None:
    """Fails fast, before TFF is imported, when a --workers address takes no
    TCP connection (no service there, wrong host or port), or when its TLS and
    ours do not match (tff_pipeline.tls.probe)."""
    from tff_pipeline import tls as tls_module

    for w in workers:
        host, _, port = w.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=timeout).close()
        except OSError as e:
            raise _no_worker(w, f"({e.strerror or e})") from None
        tls_module.probe(w, tls, timeout)


def _no_worker(address: str, why: str):
    from tff_pipeline.config import ConfigError

    return ConfigError(f"--workers: no TFF worker answered at {address} {why}; start one there "
                       f"(README, 'Remote workers') or fix the address")


def compile_for_worker(comp):
    """TFF's native compilation (``desugar_and_transform_to_native``: intrinsics to TensorFlow, call-dominant
    form, cache ids) with TensorFlow's graph optimizer left to the worker.

    TFF runs Grappler once on each graph as it compiles (inlining every function), then marks every function
    call ``disable_meta_optimizer``; its worker's sessions run with the optimizer off. Our training loop (a
    ``tf.function`` inside the shard computation) then ran as traced, unoptimised: a keyboard round took 1.18x
    the same function called in Python. TFF does this because its sessions are short and optimising them
    costs CPU (and inlining places datasets on CPU for GPU runs); ours are few, cached, and run for seconds on
    CPU. Here neither step runs, so each function is optimised by the worker when first instantiated, as in
    Python: the keyboard round went to 1.05x the Python call (README, "Speed").

    TFF's C++ runtime cannot run the secure-sum intrinsics (--secure_aggregation): as TFF's test backend does,
    they become their own quantisation, clipping and modular arithmetic, without the cryptography. A
    computation without them is unchanged."""
    from tensorflow_federated.python.core.backends.native import compiler
    from tensorflow_federated.python.core.backends.test import compiler as test_compiler
    from tensorflow_federated.python.core.environments.tensorflow_backend import (
        compiled_computation_transformations as transformations, tensorflow_tree_transformations)
    from tensorflow_federated.python.core.impl.computation import computation_impl
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    comp = test_compiler.replace_secure_intrinsics_with_bodies(comp)
    desugared, _ = tensorflow_tree_transformations.replace_intrinsics_with_bodies(comp.to_building_block())
    disable = transformations.transform_tf_call_ops_to_disable_grappler
    transformations.transform_tf_call_ops_to_disable_grappler = lambda c: (c, False)  # the one step without a flag
    try:
        return compiler.transform_to_native_form(
            computation_impl.ConcreteComputation(computation_proto=desugared.proto,
                                                 context_stack=context_stack_impl.context_stack),
            grappler_config=None)  # no static Grappler pass
    finally:
        transformations.transform_tf_call_ops_to_disable_grappler = disable


_installed: Optional[tuple] = None  # () for the local worker, else (workers, tls) of the installed context


def install_context(workers: Sequence[str] = (), tls=None) -> int:
    """Makes TFF run computations on TFF worker services; returns how many.

    Without ``workers``: one worker on localhost, started here (once) and
    stopped at exit. With ``workers`` (HOST:PORT of running worker services):
    TFF's mergeable-computation context, which splits each round's
    CLIENTS-placed values across the workers, runs the part up to the
    aggregation on each, merges the sums and runs the rest once."""
    global _installed
    workers = tuple(workers)
    key = (workers, tls) if workers else ()
    if _installed == key:
        return max(1, len(workers))
    from tensorflow_federated.python.core.backends.native import execution_contexts
    from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl
    from tensorflow_federated.python.core.impl.execution_contexts import async_execution_context
    from tensorflow_federated.python.core.impl.execution_contexts import sync_execution_context

    args = dict(compiler_fn=compile_for_worker,
                transform_args=tensorflow_computation.transform_args,
                transform_result=tensorflow_computation.transform_result)
    if workers:
        contexts = [async_execution_context.AsyncExecutionContext(executor_fn=_executor_factory(w, tls=tls), **args)
                    for w in workers]
        context = execution_contexts.create_mergeable_comp_execution_context(contexts)
    else:
        _, port = start_worker()
        context = sync_execution_context.SyncExecutionContext(executor_fn=_executor_factory(f"localhost:{port}", 60),
                                                              **args)
    context_stack_impl.context_stack.set_default_context(context)
    _installed = key
    return max(1, len(workers))


def live_worker_pids(marker: Optional[str] = None) -> list[int]:
    """PIDs of every ``worker_binary`` process on this machine (any parent);
    with ``marker``, only those whose environment holds it (a test session
    sets one, which its commands and their workers inherit, so other runs on
    the machine do not count)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")[0]
        except OSError:
            continue
        if cmd.endswith(b"worker_binary"):
            if marker is not None:
                try:
                    with open(f"/proc/{entry}/environ", "rb") as f:
                        if marker.encode() not in f.read().split(b"\0"):
                            continue
                except OSError:
                    continue
            pids.append(int(entry))
    return pids
