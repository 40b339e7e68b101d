"""Attack a finished run's model: client-level membership inference and, if
the run inserted canaries, secret-sharer exposure. Writes operator/audit.json and adds
the results to the run's privacy report.

  python scripts/audit.py --run_dir=runs/keyboard-...
"""

import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_string("run_dir", None, "A training run's --output_dir.")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    from tff_pipeline import audit

    a = audit.audit_run_dir(FLAGS.run_dir)
    print(audit.render_text(a))
    return 0


if __name__ == "__main__":
    cli.main(main)
