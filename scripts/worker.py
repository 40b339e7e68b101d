"""Runs one TFF worker service (TFF's own worker_binary) in the foreground, for
`scripts/train.py --workers=HOST:PORT,...` on another machine.

  python scripts/worker.py --port=8000        # Ctrl-C stops it

The worker listens on every interface, without TLS or authentication: it
receives the model and the clients' data, so run it only on a private network
that you trust. It needs the same pinned stack as the trainer (`uv sync --frozen`).
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_integer("port", 8000, "TCP port to serve on.")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    if not 0 < FLAGS.port < 65536:
        raise cli.UserError(f"--port={FLAGS.port} must be in 1..65535")
    from tff_pipeline import runtime

    binary = runtime.worker_binary_path()
    print(f"TFF worker serving on port {FLAGS.port} (pid {os.getpid()}); Ctrl-C stops it", flush=True)
    os.execv(binary, [binary, f"--port={FLAGS.port}", "--max_concurrent_computation_calls=-1"])


if __name__ == "__main__":
    cli.main(main, needs_tensorflow=False)
