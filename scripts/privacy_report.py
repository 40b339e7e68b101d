"""Plan privacy before training, or re-derive a run's ε. Never imports TFF.

  # forward: settings -> ε
  python scripts/privacy_report.py --population=1139 --clients_per_round=20 --noise_multiplier=0.8 --rounds=30
  # backward: target ε -> noise multiplier, or -> rounds affordable
  python scripts/privacy_report.py --population=1139 --clients_per_round=20 --rounds=30 --target_epsilon=1
  python scripts/privacy_report.py --population=1139 --clients_per_round=20 --noise_multiplier=1 --target_epsilon=8
  # example level (DP-SGD inside each client)
  python scripts/privacy_report.py --unit=example --examples_per_client=228 --batch_size=16 --local_steps=10 \
      --noise_multiplier=1.1 --rounds=50
  # DP-FTRL (no sampling assumed; a tree per epoch of 1139 // 100 rounds)
  python scripts/privacy_report.py --mechanism=dp_ftrl --population=1139 --clients_per_round=100 --rounds=30 \
      --target_epsilon=3
  # an existing run
  python scripts/privacy_report.py --run_dir=runs/keyboard-... --format=markdown
"""

import dataclasses
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

flags.DEFINE_enum("mechanism", None, ["dp_fedavg", "dp_ftrl", "dp_sgd"], "The mechanism to plan: dp_fedavg "
                  "(default at --unit=client), dp_ftrl (DP-FTRL: epochs of population // clients_per_round rounds, one "
                  "noise tree each), dp_sgd (default at --unit=example).")
flags.DEFINE_enum("unit", "client", ["client", "example"], "Unit of privacy: client (DP-FedAvg, user level) or "
                  "example (DP-SGD inside each client, record level).")
flags.DEFINE_integer("population", None, "Clients that can be sampled (unit=client).")
flags.DEFINE_integer("clients_per_round", None, "Expected (poisson) or exact (fixed) clients per round.")
flags.DEFINE_float("sampling_probability", None, "Instead of --clients_per_round: Poisson q per round.")
flags.DEFINE_enum("sampling", "poisson", ["poisson", "fixed"], "Client sampling scheme (unit=client).")
flags.DEFINE_float("noise_multiplier", None, "Gaussian noise multiplier z.")
flags.DEFINE_integer("rounds", None, "Rounds.")
flags.DEFINE_float("delta", 1e-5, "δ.")
flags.DEFINE_float("target_epsilon", None, "Target ε: with --rounds solves for z; with --noise_multiplier "
                   "solves for the rounds affordable.")
flags.DEFINE_float("clipped_count_stddev", None, "σ_b of adaptive clipping (unit=client); default 0.05 x "
                   "clients_per_round.")
flags.DEFINE_integer("examples_per_client", None, "Examples in one client (unit=example).")
flags.DEFINE_integer("batch_size", None, "Expected DP-SGD batch size (unit=example).")
flags.DEFINE_integer("local_steps", None, "DP-SGD steps per client per round (unit=example).")
flags.DEFINE_string("run_dir", None, "Re-derive ε of this training run from its recorded DpEvent.")
flags.DEFINE_enum("format", "text", ["text", "json", "markdown"], "Output format on stdout.")
flags.DEFINE_string("output_dir", None, "Also write privacy_report.json/.md/.html (and a plan's ε-over-rounds plot, "
                    "privacy_report.png) here, with the operator copy of the HTML page in operator/ (with --run_dir, "
                    "it shows that run's operator-only files).")
FLAGS = flags.FLAGS


def main(argv):
    cli.check_no_extra_args(argv)
    import json

    from tff_pipeline import planner, report

    if FLAGS.run_dir:
        rep = planner.rederive(FLAGS.run_dir)
    else:
        names = [f.name for f in dataclasses.fields(planner.PlanRequest)]
        rep = planner.plan(planner.PlanRequest(**{n: FLAGS[n].value for n in names}))
    if FLAGS.output_dir:
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        report.write(FLAGS.output_dir, rep)
        planner.plot_curve(rep, FLAGS.output_dir)
        from tff_pipeline import html_report

        html_report.write_pages(FLAGS.output_dir, rep, source_dir=FLAGS.run_dir)
    if FLAGS.format == "json":
        print(json.dumps(rep, indent=2))
    elif FLAGS.format == "markdown":
        print(report.render_markdown(rep))
    else:
        print(planner.render_text(rep))
    if rep.get("rederived") and not rep["rederived"]["matches_report"]:
        return 1
    return 0


if __name__ == "__main__":
    cli.main(main, needs_tensorflow=False)
