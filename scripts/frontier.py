"""Privacy–utility frontier: one training per target ε (and seed) on the same
split, with z calibrated for each, beside public-only, the task's baselines
and the central ceiling. Takes every flag of scripts/train.py.

  python scripts/frontier.py --flagfile=configs/keyboard.cfg --epsilons=1,2,4,8,inf --seeds=0,1,2
  make frontier

Writes frontier.csv, frontier_summary.csv, frontier.md, frontier.png and
frontier.json in --output_dir (default runs/frontier-<task>), and one run
directory per point beside them (a finished point is read, not retrained),
whose operator/privacy_report.html then shows the frontier too.
"""

import datetime
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

cli.define_flags()
flags.DEFINE_string("epsilons", "1,2,4,8,inf", "Target ε of each point (δ = --delta); inf = federated without DP.")
flags.DEFINE_string("seeds", "0", "Seeds, e.g. 0,1,2: each point is trained once per seed (split, initialisation and "
                    "batching follow the seed); the table gives the mean and the range.")
flags.DEFINE_integer("central_epochs", 3, "Epochs of the central (no DP, not federated) ceiling; 0 = skip it.")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    from tff_pipeline import frontier

    cfg = cli.config_from_flags(FLAGS)
    epsilons = frontier.parse_epsilons(FLAGS.epsilons)
    try:
        seeds = [int(s) for s in FLAGS.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise cli.UserError(f"--seeds={FLAGS.seeds!r} must be seeds >= 0, e.g. 0,1,2")
    if FLAGS.central_epochs < 0:
        raise cli.UserError(f"--central_epochs={FLAGS.central_epochs} must be >= 0 (0 = no central ceiling)")
    base = os.path.abspath(cfg.output_dir if FLAGS["output_dir"].present else os.path.join("runs", f"frontier-{cfg.task}"))

    def log(msg):
        print(msg, flush=True)

    log(f"frontier of {cfg.task}: ε {', '.join(f'{e:g}' for e in epsilons)} x seeds {seeds} -> {base}")
    try:
        rows = [frontier.run_point(cfg, e, s, base, log) for s in seeds for e in epsilons]
    except frontier.Interrupted as e:
        print(e, file=sys.stderr, flush=True)
        return 130
    ceiling = frontier.central_ceiling(cfg, FLAGS.central_epochs, log) if FLAGS.central_epochs else None
    metrics = [k for k in rows[0] if k.startswith(("test_", "unseen_")) and not k.endswith(("loss", "perplexity"))]
    summary = frontier.summarise(rows, metrics)
    headline = rows[0]["headline_metric"]
    lines = frontier.reference_lines(rows, headline, ceiling)
    meta = {"task": cfg.task, "date": datetime.date.today().isoformat(), "commit": _commit(), "seeds": len(seeds),
            "epsilons": FLAGS.epsilons, "central_epochs": FLAGS.central_epochs, "ceiling": ceiling}
    paths = frontier.write(base, rows, summary, lines, headline, metrics, meta)
    frontier.write_point_pages(base, rows)
    print()
    print(open(paths[2]).read())
    for p in paths:
        print(f"written: {p}")
    return 0


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    cli.main(main)
