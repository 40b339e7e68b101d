"""Train a task with DP-FedAvg + adaptive clipping; write report and SavedModel.

  python scripts/train.py --task=keyboard --output_dir=runs/kb --rounds=100 \
      --clients_per_round=20 --target_epsilon=8 --delta=1e-5
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import app, flags

from tff_pipeline import cli
cli.define_flags()
flags.DEFINE_boolean("overwrite", False, "Replace the files of an earlier run in --output_dir.")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    cfg = cli.config_from_flags(FLAGS)
    from tff_pipeline.train import run

    summary = run(cfg, overwrite=FLAGS.overwrite)
    return 130 if summary.get("interrupted") else 0


if __name__ == "__main__":
    cli.main(main)
