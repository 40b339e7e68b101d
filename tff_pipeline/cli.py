"""absl glue shared by the scripts: flags from a config dataclass, and a main
wrapper that turns user mistakes into one-line errors with exit code 2."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from tff_pipeline import config
from tff_pipeline.errors import UserError  # every user mistake derives from it


def define_flags() -> None:
    """scripts/train.py's flags: the run's, the mechanism's and every task's settings (tff_pipeline.config), each
    with the --help text its dataclass field carries."""
    define = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
              bool: flags.DEFINE_boolean}
    for name, (f, t, part) in config.flag_table().items():
        define[t](name, f.default, f.metadata["help"])


def config_from_flags(flag_values):
    """The TrainConfig of the parsed flags; of the tasks' settings only those given, so that another task's
    setting is refused by name (--history with --task=keyboard) rather than silently unused."""
    return config.make(**{name: flag_values[name].value for name, (_, _, part) in config.flag_table().items()
                          if part != "task" or flag_values[name].present})


def check_no_extra_args(argv) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}; every setting is a --flag (see --help)")



def main(fn, needs_tensorflow: bool = True) -> None:
    """app.run(fn), printing user mistakes as one line with exit code 2 and
    always stopping TFF's worker processes.

    TensorFlow is imported before absl parses flags: imported for the first
    time inside ``app.run``, Keras 2.14 builds functional models from graph
    tensors and fails ("'SymbolicTensor' object has no attribute 'node'").
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if needs_tensorflow:
        import tensorflow as tf

        tf.get_logger().setLevel("ERROR")
    logging.set_verbosity(logging.WARNING)

    def wrapped(argv):
        try:
            return call(fn, argv)
        finally:
            if "tff_pipeline.runtime" in sys.modules:
                sys.modules["tff_pipeline.runtime"].stop_workers()

    app.run(wrapped)


def call(fn, argv) -> int:
    """fn(argv) with a user mistake printed as one ``error:`` line on stderr and exit code 2; any other exception
    propagates (a traceback: our bug, not the user's). The tests call scripts' mains through it in-process."""
    try:
        return fn(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
