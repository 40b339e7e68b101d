"""Runs one TFF worker service (TFF's own worker_binary) in the foreground, for
`scripts/train.py --workers=HOST:PORT,...` on another machine.

  python scripts/worker.py --port=8000        # Ctrl-C stops it; kill -USR1 <pid> prints its threads' stacks

Plain: the worker listens on every interface, without TLS or authentication:
it receives the model and the clients' data, so run it only on a private
network that you trust.

Mutual TLS (--tls_cert, --tls_key, --tls_client_ca): the worker binary
listens on --internal_port and a TLS terminator of ours (tff_pipeline.tls)
on --port accepts only coordinators whose certificate --tls_client_ca
signed; the coordinator gives --workers_tls_ca, --workers_tls_cert and
--workers_tls_key. TFF's binary still listens on every interface on the
internal port: keep that port unreachable from the network (a firewall rule
or a container network; README, "Remote workers").

It needs the same pinned stack as the trainer (`uv sync --frozen`).
"""

import os
import signal
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_integer("port", 8000, "TCP port to serve on (with TLS: the TLS port).")
flags.DEFINE_string("tls_cert", "", "Mutual TLS: this worker's certificate (PEM), issued for the host name or IP "
                    "address the coordinator dials.")
flags.DEFINE_string("tls_key", "", "Mutual TLS: the private key (PEM) of --tls_cert.")
flags.DEFINE_string("tls_client_ca", "", "Mutual TLS: the CA (PEM) whose signature a coordinator's certificate "
                    "must carry.")
flags.DEFINE_integer("internal_port", 0, "With TLS: the plaintext port of TFF's worker binary (0: a free one); keep "
                     "it unreachable from the network.")
FLAGS = flags.FLAGS


def _check_port(name: str, port: int, zero_ok: bool = False) -> None:
    if not (0 <= port < 65536 if zero_ok else 0 < port < 65536):
        raise cli.UserError(f"--{name}={port} must be in {'0' if zero_ok else '1'}..65535")


def main(argv):
    cli.check_no_extra_args(argv)
    _check_port("port", FLAGS.port)
    _check_port("internal_port", FLAGS.internal_port, zero_ok=True)
    from tff_pipeline import runtime

    binary = runtime.worker_binary_path()
    tls_flags = (FLAGS.tls_cert, FLAGS.tls_key, FLAGS.tls_client_ca)
    if not any(tls_flags):
        print(f"TFF worker serving on port {FLAGS.port} (pid {os.getpid()}), plaintext gRPC: private networks "
              f"only; Ctrl-C stops it", flush=True)
        os.execv(binary, [binary, f"--port={FLAGS.port}", "--max_concurrent_computation_calls=-1"])
    if not all(tls_flags):
        raise cli.UserError("mutual TLS needs all three of --tls_cert, --tls_key and --tls_client_ca")
    import asyncio
    import faulthandler

    from tff_pipeline import tls

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a worker that seems stuck: where every thread is

    ctx = tls.server_context(FLAGS.tls_cert, FLAGS.tls_key, FLAGS.tls_client_ca)
    if FLAGS.internal_port == FLAGS.port:
        raise cli.UserError(f"--internal_port={FLAGS.internal_port} must differ from --port")
    _, internal = runtime.start_worker(port=FLAGS.internal_port or None)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    ready = lambda: print(f"TFF worker serving mutual TLS on port {FLAGS.port} (pid {os.getpid()}); its binary "  # noqa: E731
                          f"listens on internal port {internal}: keep that one unreachable from the network; "
                          f"Ctrl-C stops it", flush=True)
    try:
        asyncio.run(tls.Forwarder(ctx, FLAGS.port, internal).serve(ready))
    except KeyboardInterrupt:
        pass
    except OSError as e:
        raise cli.UserError(f"--port={FLAGS.port}: cannot listen there ({e.strerror or e}); pick a free port")
    finally:
        runtime.stop_workers()
    return 0


if __name__ == "__main__":
    cli.main(main, needs_tensorflow=False)
