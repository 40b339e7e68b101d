"""Personalize a finished run's model on each evaluation client (what --personalize does at the end of training):
each client fine-tunes the released model on its own training part and is scored on its own held-out part, before
and after. Writes operator/personalization.{json,png} and the per-client columns of
operator/heldout_by_client.csv; changes neither the model nor the privacy report.

  python scripts/personalize.py --run_dir=runs/medical [--personalize_steps=20 --personalize_learning_rate=0.1
      --personalize_layers=all|head|adapters --personalize_clients=200] [--validation]

Unset --personalize_* flags take the run's settings (config.json). --validation scores on the last 20% of each
client's training part instead (operator/personalization_validation.{json,png}): for choosing the settings without
looking at the held-out data the result is reported on.
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_string("run_dir", None, "A finished training run's --output_dir.")
flags.DEFINE_integer("personalize_steps", None, "Local SGD steps on each client (default: the run's setting).")
flags.DEFINE_float("personalize_learning_rate", None, "Learning rate of the local steps (default: the run's).")
flags.DEFINE_string("personalize_layers", None, "all, head or adapters (default: the run's).")
flags.DEFINE_integer("personalize_clients", None, "At most this many clients, a fixed public draw; 0 = all "
                     "(default: the run's).")
flags.DEFINE_boolean("validation", False, "Fine-tune on the earlier 80% of each client's training part and score "
                     "on the rest, not on its held-out part (for choosing the settings).")
FLAGS = flags.FLAGS

NAMES = ("personalize_steps", "personalize_learning_rate", "personalize_layers", "personalize_clients")


def main(argv):
    cli.check_no_extra_args(argv)
    from tff_pipeline import personalize, progress

    def log(line: str) -> None:
        print(line, flush=True)

    with progress.Console(log, tty=sys.stdout.isatty()) as console:
        personalize.personalize_run_dir(FLAGS.run_dir, {k: FLAGS[k].value for k in NAMES}, FLAGS.validation,
                                        log=console)
    return 0


if __name__ == "__main__":
    cli.main(main)
