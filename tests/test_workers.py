"""--workers: training on two TFF worker services (TFF's own worker_binary) on
127.0.0.1, the cohort split across them, gives the model of a local run."""

import os

import h5py
import numpy as np

from conftest import call_train, finish, load_json, start_script
from tff_pipeline import runtime

ARGS = ["--task=medical", "--privacy_unit=client", "--clients_per_round=4", "--sampling=fixed",
        "--noise_multiplier=0", "--rounds=3", "--eval_every=3", "--seed=3", "--model_dim=16", "--heads=2",
        "--layers=1", "--ff_dim=32", "--batch_size=16", "--client_learning_rate=0.1", "--server_optimizer=sgdm",
        "--server_learning_rate=1.0"]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _weights(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_two_workers_match_a_local_run(tmp_path):
    workers = [runtime.start_worker(log_path=str(tmp_path / f"worker{i}.log")) for i in range(2)]
    try:
        idle = [_cpu_seconds(p.pid) for p, _ in workers]
        # The two runs side by side: their start-up (imports, model building) is mostly one core each.
        local = start_script("train.py", f"--output_dir={tmp_path / 'local'}", *ARGS)
        remote = start_script("train.py", f"--output_dir={tmp_path / 'remote'}",
                              "--workers=" + ",".join(f"127.0.0.1:{port}" for _, port in workers), *ARGS)
        local, remote = finish(local), finish(remote)
        assert local.returncode == 0, local.stderr[-3000:]
        assert remote.returncode == 0, remote.stderr[-3000:]
        busy = [_cpu_seconds(p.pid) - t for (p, _), t in zip(workers, idle)]
        # Both trained clients: an idle worker used 0.01 CPU s in 60 s; each of these used 0.5-0.6 s on 2026-12-03
        # (about half of what it did before the shard loop stopped re-instantiating its body every call).
        assert all(b > 0.2 for b in busy), f"worker CPU seconds during the run: {busy}"
    finally:
        runtime.stop_workers()
    assert all(p.poll() is not None for p, _ in workers)

    a, b = _weights(tmp_path / "local" / "final_weights.h5"), _weights(tmp_path / "remote" / "final_weights.h5")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5, err_msg=k)
    moved = max(float(np.max(np.abs(v))) for v in a.values())
    assert moved > 0
    ra, rb = (load_json(tmp_path / d / "operator" / "summary.json") for d in ("local", "remote"))
    assert ra["rounds_run"] == rb["rounds_run"] == 3
    la = load_json(tmp_path / "local" / "config.json")["config"]["workers"]
    assert la == "" and load_json(tmp_path / "remote" / "config.json")["config"]["workers"].count(":") == 2


def test_unreachable_worker_is_one_line(tmp_path):
    port = runtime._free_port()  # nothing listens there
    p = call_train(f"--output_dir={tmp_path / 'r'}", f"--workers=127.0.0.1:{port}", *ARGS)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        f"error: --workers: no TFF worker answered at 127.0.0.1:{port} (Connection refused); start one there "
        f"(README, 'Remote workers') or fix the address")
    assert not os.listdir(tmp_path / "r") or os.listdir(tmp_path / "r") == [".lock"]


def _call_op_optimizer_flags(computation):
    """For every function call (PartitionedCall / StatefulPartitionedCall) in the TensorFlow graphs of a compiled
    computation: whether its config disables TensorFlow's graph optimizer."""
    import tensorflow as tf
    from tensorflow_federated.proto.v0 import computation_pb2
    from tensorflow_federated.python.core.impl.computation import computation_impl

    flags = []

    def walk(msg):
        if isinstance(msg, computation_pb2.Computation) and msg.WhichOneof("computation") == "tensorflow":
            graph = tf.compat.v1.GraphDef()
            msg.tensorflow.graph_def.Unpack(graph)
            for node in [*graph.node, *(n for f in graph.library.function for n in f.node_def)]:
                if node.op in ("PartitionedCall", "StatefulPartitionedCall") and "config_proto" in node.attr:
                    config = tf.compat.v1.ConfigProto.FromString(node.attr["config_proto"].s)
                    flags.append(config.graph_options.rewrite_options.disable_meta_optimizer)
        for field, value in msg.ListFields():
            if field.type == field.TYPE_MESSAGE:
                for m in (value if field.label == field.LABEL_REPEATED else [value]):
                    walk(m)

    walk(computation_impl.ConcreteComputation.get_proto(computation))
    return flags


def test_the_worker_gets_our_tf_functions_with_the_graph_optimizer_on():
    """TFF's native compiler inlines every function and then disables TensorFlow's graph optimizer in every
    function call, so the worker ran our training loop unoptimised; runtime.compile_for_worker keeps the calls
    and leaves the optimizer on (README, "Speed")."""
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.backends.native import compiler

    @tf.function
    def step(x):
        for _ in tf.range(3):
            x = x * 2.0 + 1.0
        return x

    @tff.tensorflow.computation(tff.TensorType(np.float32, [4]))
    def comp(x):
        return step(x)

    assert _call_op_optimizer_flags(compiler.desugar_and_transform_to_native(comp)) in ([], [True])  # TFF's own
    ours = _call_op_optimizer_flags(runtime.compile_for_worker(comp))
    assert ours and not any(ours)
    runtime.install_context()
    np.testing.assert_allclose(comp(np.ones(4, np.float32)), np.full(4, 15.0))
