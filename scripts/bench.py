"""Benchmark seconds per round: our DP-FedAvg, TFF's stock builder with the
same DP aggregator, and central Keras training of the same examples.

  python scripts/bench.py --workload=w1 --output=bench-w1.json
  make bench                      # every workload, JSON in bench/
"""

import json
import os
import sys

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

WORKLOADS = ("w1", "w2", "keyboard", "medical", "traffic")
flags.DEFINE_enum("workload", "w1", WORKLOADS + ("all",), "Workload to measure (all = every one).")
flags.DEFINE_integer("rounds", 10, "Rounds measured per variant (after one warm-up round); the median is reported.")
flags.DEFINE_integer("clients_per_round", 0, "Override the workload's clients per round (0 = its default).")
flags.DEFINE_integer("population", 1000, "Synthetic workloads (w1, w2): clients to sample from; their data is "
                     "built per round from the sampled ids, so memory should not grow with this.")
flags.DEFINE_string("variants", "pipeline,tff_stock,central", "Comma-separated: pipeline, tff_stock, central.")
flags.DEFINE_string("output", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS

CONFIGS = {"keyboard": "configs/keyboard.cfg", "medical": "configs/medical.cfg", "traffic": "configs/traffic.cfg"}


def main(argv):
    cli.check_no_extra_args(argv)
    if FLAGS.rounds < 1:
        raise cli.UserError(f"--rounds={FLAGS.rounds} must be at least 1")
    variants = tuple(v.strip() for v in FLAGS.variants.split(",") if v.strip())
    bad = [v for v in variants if v not in ("pipeline", "tff_stock", "central")]
    if bad or not variants:
        raise cli.UserError(f"--variants={FLAGS.variants!r}: choose from pipeline, tff_stock, central")
    from tff_pipeline import bench

    results = []
    for name in WORKLOADS if FLAGS.workload == "all" else (FLAGS.workload,):
        if FLAGS.population < 1:
            raise cli.UserError(f"--population={FLAGS.population} must be at least 1")
        kw = {"clients_per_round": FLAGS.clients_per_round} if FLAGS.clients_per_round else {}
        kw["population"] = FLAGS.population
        if name == "w1":
            w = bench.w1(**kw)
        elif name == "w2":
            w = bench.w2(**kw)
        else:
            kw.pop("population")
            w = bench.real_task(name, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                   CONFIGS[name]))
        results.append(bench.measure(w, variants, FLAGS.rounds))
    print()
    print(f"{'workload':9s} {'variant':10s} {'s/round':>8s} {'ex/s':>9s} {'x central':>9s}")
    for r in results:
        for v, m in r["variants"].items():
            ratio = m.get("ratio_to_central")
            print(f"{r['workload']:9s} {v:10s} {m['median_s_per_round']:8.3f} {m['examples_per_s']:9.0f} "
                  f"{'' if ratio is None else f'{ratio:9.2f}'}")
    if FLAGS.output:
        from tff_pipeline import report

        report.atomic_write_text(FLAGS.output, json.dumps(results, indent=2) + "\n")
        print(f"\nwritten: {FLAGS.output}")
    return 0


if __name__ == "__main__":
    cli.main(main)
