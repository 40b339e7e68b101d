"""Benchmark seconds per round: our DP-FedAvg, TFF's stock builder with the
same DP aggregator, and central Keras training of the same examples (the
limit: pre-batched tensors in one traced loop; and the same fed by tf.data).

  python scripts/bench.py --workload=w1 --output=bench-w1.json
  make bench                      # every workload, JSON in bench/
"""

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # repo root, not scripts/

from absl import flags

from tff_pipeline import cli

WORKLOADS = ("w1", "w2", "keyboard", "medical", "traffic")
flags.DEFINE_enum("workload", "w1", WORKLOADS + ("all",), "Workload to measure (all = every one).")
flags.DEFINE_integer("rounds", 10, "Rounds measured per variant (after one warm-up round); the median is reported.")
flags.DEFINE_string("clients_per_round", "0", "Override the workload's clients per round (0 = its default). Several, "
                    "e.g. 10,25,50: measure each and fit seconds per client (the slope) for each variant.")
flags.DEFINE_integer("population", 1000, "Synthetic workloads (w1, w2): clients to sample from; their data is "
                     "built per round from the sampled ids, so memory should not grow with this.")
flags.DEFINE_string("variants", "pipeline,per_client,tff_stock,central,central_tfdata",
                    "Comma-separated, in any order: pipeline (ours), per_client (ours before the cohort round), "
                    "tff_stock, central (the limit: pre-batched tensors in one traced loop; ratios are to it), "
                    "central_tfdata (the same pass fed by tf.data).")
flags.DEFINE_string("workers", "", "HOST:PORT,... of running TFF worker services (empty: one local worker).")
flags.DEFINE_string("output", "", "Write the results as JSON here.")
FLAGS = flags.FLAGS

CONFIGS = {"keyboard": "configs/keyboard.cfg", "medical": "configs/medical.cfg", "traffic": "configs/traffic.cfg"}


def _checked_flags():
    """(variants, worker addresses, clients-per-round sizes), or a one-line error naming the flag."""
    if FLAGS.rounds < 1:
        raise cli.UserError(f"--rounds={FLAGS.rounds} must be at least 1")
    variants = tuple(v.strip() for v in FLAGS.variants.split(",") if v.strip())
    from tff_pipeline import bench
    from tff_pipeline.config import make

    bad = [v for v in variants if v not in bench.VARIANTS]
    if bad or not variants:
        raise cli.UserError(f"--variants={FLAGS.variants!r}: choose from {', '.join(bench.VARIANTS)}")
    workers = make(workers=FLAGS.workers).worker_addresses  # checks HOST:PORT
    try:
        sizes = [int(c) for c in FLAGS.clients_per_round.split(",")]
    except ValueError:
        sizes = [-1]
    if any(c < 0 for c in sizes):
        raise cli.UserError(f"--clients_per_round={FLAGS.clients_per_round!r} must be a count or counts, e.g. 10,25,50")
    if FLAGS.population < 1:
        raise cli.UserError(f"--population={FLAGS.population} must be at least 1")
    return variants, workers, sizes


def _workload(name: str, cpr: int):
    from tff_pipeline import bench

    kw = {"clients_per_round": cpr} if cpr else {}
    if name == "w1":
        return bench.w1(population=FLAGS.population, **kw)
    if name == "w2":
        return bench.w2(population=FLAGS.population, **kw)
    return bench.real_task(name, os.path.join(ROOT, CONFIGS[name]), **kw)


def _print_slopes(results, variants) -> None:
    from tff_pipeline import bench

    print()
    for name in dict.fromkeys(r["workload"] for r in results):
        for v in variants:
            pts = [(r["clients_per_round"], r["variants"][v]["median_s_per_round"]) for r in results
                   if r["workload"] == name]
            a, b = bench.slope(pts)
            print(f"{name:9s} {v:10s} {a:.4f} s per client per round (+{b:.3f} s)  from " +
                  ", ".join(f"{c}: {s:.3f}" for c, s in pts))


def _print_table(results) -> None:
    print()
    print(f"{'workload':9s} {'variant':10s} {'s/round':>8s} {'ex/s':>9s} {'x central':>9s} "
          f"{'per-round ratio min/med/max':>28s} {'with prepare':>15s} {'prepare s':>9s} {'+MB build/rounds':>17s}"
          f"  (peak RSS MB)")
    for r in results:
        for v, m in r["variants"].items():
            ratio = m.get("ratio_to_central")
            sp = m.get("ratio_per_round_spread")
            spread = "" if sp is None else f"{sp['min']:.2f}/{sp['median']:.2f}/{sp['max']:.2f}"
            wp = m.get("ratio_with_prepare_spread")
            with_prepare = "" if wp is None else f"{wp['min']:.2f}/{wp['median']:.2f}/{wp['max']:.2f}"
            mg = m["memory_growth_mb"]
            print(f"{r['workload']:9s} {v:10s} {m['median_s_per_round']:8.3f} {m['examples_per_s']:9.0f} "
                  f"{'' if ratio is None else f'{ratio:.2f}':>9s} {spread:>28s} {with_prepare:>15s} "
                  f"{m['prepare_s_per_round']:9.3f} "
                  f"{mg['build_mb']:8.0f}/{mg['rounds_mb']:<8.0f}")
        print(f"{r['workload']:9s} {'':10s} {'':8s} {'':9s} {'':9s}  {r['peak_rss_mb']:.0f}")


def main(argv):
    cli.check_no_extra_args(argv)
    variants, workers, sizes = _checked_flags()
    from tff_pipeline import bench

    t = time.monotonic()
    import tensorflow_federated  # noqa: F401  (start-up, reported apart from the rounds)

    import_s = time.monotonic() - t
    print(f"import tensorflow_federated: {import_s:.1f} s (after tensorflow)")
    results = []
    for name in WORKLOADS if FLAGS.workload == "all" else (FLAGS.workload,):
        for cpr in sizes:
            r = bench.measure(_workload(name, cpr), variants, FLAGS.rounds, workers=workers)
            r["import_tff_s"] = import_s
            results.append(r)
    if len(sizes) > 1:
        _print_slopes(results, variants)
    _print_table(results)
    if FLAGS.output:
        from tff_pipeline.io import atomic_write_text

        atomic_write_text(FLAGS.output, json.dumps(results, indent=2) + "\n")
        print(f"\nwritten: {FLAGS.output}")
    return 0


if __name__ == "__main__":
    cli.main(main)
