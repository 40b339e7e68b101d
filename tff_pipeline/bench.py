"""Seconds per round, side by side on the same data and model:

* ``pipeline``: our DP-FedAvg process (``tff_pipeline.cohort``: the cohort in
  one TF computation per worker), including splitting the cohort into shards;
* ``per_client``: the pipeline before ``cohort`` (TFF's per-client
  ``build_unweighted_fed_avg`` with our non-finite guard around
  ``gaussian_adaptive``), kept as the "before" column;
* ``tff_stock``: TFF's ``build_unweighted_fed_avg`` with the same
  ``gaussian_adaptive`` DP aggregator and optimizers;
* ``central``: the limit, the fastest honest central pass: the round's
  batches (the same steps and batch sizes as the clients'), already in memory
  as one pre-batched tensor ([steps, batch, ...], built untimed like the
  client datasets), trained by one traced loop (``tf.range`` over the steps)
  with the same model and trainable weights, loss, SGD update
  (``cohort.apply_sgd``) and learning rate, no ``tf.data`` in the loop;
* ``central_tfdata``: the same pass fed by a ``tf.data`` concatenation of
  the cohort's datasets (the bench's "central" until 2026-12-06), a second
  reference.

Each round's client datasets are built once, untimed, and every variant
trains on them in turn (interleaved round by round, so drift in machine speed
hits all variants alike).

Workloads: W1 (keyboard-like causal Transformer, synthetic tokens), W2
(tabular attention, synthetic rows), and each real task's default config.
Synthetic client data is built per round from the sampled ids, never held
for the whole population. Used by ``scripts/bench.py``; not part of the tests.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Callable

import numpy as np

from tff_pipeline.config import TrainConfig, make, read_flagfile


@dataclasses.dataclass
class Workload:
    name: str
    task: Any  # tff_pipeline.task.Task
    cfg: TrainConfig
    clients_per_round: int
    description: str


def _peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """VmHWM (peak resident set) or VmRSS (current) of a process, in MB; 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _rss_mb() -> float:
    """Resident memory now of this process and the local TFF worker(s), in MB."""
    from tff_pipeline import runtime

    return _peak_rss_mb(os.getpid(), "VmRSS") + sum(_peak_rss_mb(p.pid, "VmRSS") for p in runtime._processes)


def spread(values: list[float]) -> dict[str, float]:
    """min / median / max of a list of per-round values."""
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _synthetic_task(name: str, build_model, loss, make_client, population: int, batch_size: int):
    import tensorflow as tf

    from tff_pipeline.task import Task

    def client_dataset(i: int, round_seed: int):
        x, y = make_client(i, round_seed)
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)

    def no_eval(model):
        from tff_pipeline.task import Evaluation

        return Evaluation({})

    def export(model, path):
        tf.saved_model.save(model, path)

    return Task(name=name, population=population, client_dataset=client_dataset, build_model=build_model,
                loss=loss, metrics=lambda: [], evaluate=no_eval, export=export, summary={},
                privacy_unit="one synthetic client", headline_metric="")


def w1(population: int = 1000, clients_per_round: int = 50) -> Workload:
    """Keyboard-like: vocab 10k, length 20, d 96, 4 heads, 64 sequences per
    client, batch 16."""
    import tensorflow as tf

    from tff_pipeline import models

    vocab, length, n = 10_000, 20, 64

    def make_client(i, round_seed):
        rng = np.random.default_rng([i, 0xB1])  # a client's data depends on its id only
        tokens = rng.zipf(1.3, size=(n, length + 1)).clip(1, vocab - 1).astype(np.int32)
        return tokens[:, :-1], tokens[:, 1:]

    task = _synthetic_task(
        "w1", lambda: models.causal_transformer_lm(vocab, length, 96, 4, 1, 192),
        lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True), make_client, population, 16)
    cfg = make(task="w1", clients_per_round=clients_per_round, noise_multiplier=1.0, batch_size=16,
               client_learning_rate=0.5, server_optimizer="adam", server_learning_rate=0.003,
               clipped_count_stddev=max(0.05 * clients_per_round, 1.0))  # TFF's default, or 1 for small cohorts
    return Workload("w1", task, cfg, clients_per_round,
                    f"causal Transformer, vocab 10k, len 20, d 96, {clients_per_round} clients x 64 seq, batch 16")


def w2(population: int = 1000, clients_per_round: int = 10) -> Workload:
    """Tabular attention: 30 feature tokens, about 115 rows per client."""
    import tensorflow as tf

    from tff_pipeline import models

    features, rows = 30, 115

    def build():
        inp = tf.keras.Input(shape=(features,), dtype=tf.float32, name="features")
        x = tf.keras.layers.Reshape((features, 1))(inp)
        x = tf.keras.layers.Dense(32, name="feature_embedding")(x)
        x = models.PositionEmbedding(features, 32, name="feature_id")(x)
        x = models.transformer_block(x, 32, 4, 64, 0.0, causal=False, name="block0")
        x = tf.keras.layers.GlobalAveragePooling1D()(x)
        return tf.keras.Model(inp, tf.keras.layers.Dense(1)(x))

    def make_client(i, round_seed):
        rng = np.random.default_rng([i, 0xB2])
        x = rng.normal(size=(rows, features)).astype(np.float32)
        y = (x[:, :3].sum(1) + rng.normal(size=rows) > 0).astype(np.float32)[:, None]
        return x, y

    task = _synthetic_task("w2", build, lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True),
                           make_client, population, 16)
    cfg = make(task="w2", clients_per_round=clients_per_round, noise_multiplier=0.5, batch_size=16,
               client_learning_rate=0.1, server_optimizer="adam", server_learning_rate=0.003,
               clipped_count_stddev=0.5)
    return Workload("w2", task, cfg, clients_per_round,
                    f"tabular attention, 30 feature tokens, {clients_per_round} clients x {rows} rows, batch 16")


def real_task(name: str, config_file: str, clients_per_round: int = 0) -> Workload:
    """A real task at its default config (client level: DP-FedAvg)."""
    import tasks

    cfg = make(**read_flagfile(config_file)).replace(privacy_unit="client")  # medical's default is example
    if clients_per_round:
        cfg = cfg.replace(clients_per_round=clients_per_round)
    if cfg.privacy.target_epsilon is not None:
        cfg = cfg.replace(target_epsilon=None, noise_multiplier=1.0)
    task = tasks.build(cfg)
    cpr = min(cfg.privacy.clients_per_round, task.population)
    z = cfg.privacy.noise_multiplier or 0.0
    if cfg.privacy.clipped_count_stddev is None and z >= 0.1 * cpr:  # small cohorts (medical): let clipping adapt
        cfg = cfg.replace(clipped_count_stddev=z)
    return Workload(name, task, cfg.replace(clients_per_round=cpr), cpr,
                    f"{name} task, {config_file}, {cpr} clients per round")


def _central_model(task, cfg: TrainConfig):
    """The round's Keras model with the round's trainable weights (--freeze_layers, or only the adapters): the
    limit trains what the round trains, no more."""
    from tff_pipeline import dp_fedavg

    return dp_fedavg.build_keras_model(task, cfg.frozen_layers)


def _central_step(model, loss_fn, lr: float):
    """One central SGD step on a batch: the clients' loss and update (``cohort.apply_sgd``), without metrics."""
    import tensorflow as tf

    from tff_pipeline import cohort

    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.add_n([loss_fn(y, model(x, training=True))] + model.losses)
        cohort.apply_sgd(model.trainable_variables, tape.gradient(loss, model.trainable_variables), lr)

    return step


def _central_round(task, cfg: TrainConfig) -> Callable[[list], None]:
    """One pass of plain SGD over the round's examples as one tf.data concatenation in one traced loop (the
    second reference: the bench's limit before 2026-12-06)."""
    import tensorflow as tf

    from tff_pipeline import cohort

    model = _central_model(task, cfg)
    step = _central_step(model, task.loss(), cohort.client_learning_rate(cfg))

    @tf.function(reduce_retracing=True)
    def epoch(ds):  # the whole pass in one traced loop, as TFF's client work runs it
        for x, y in iter(ds):  # an iterator, not ReduceDataset (see cohort._make_shard_update)
            step(x, y)

    def run(datasets):
        ds = datasets[0]
        for d in datasets[1:]:
            ds = ds.concatenate(d)
        epoch(cohort.without_autotune(ds))  # as our shards are fed (cohort.without_autotune)

    return run


class _CentralBatched:
    """One pass of plain SGD over the round's batches as tensors in one traced loop: the limit. The same model,
    trainable weights, loss, update (``cohort.apply_sgd``), learning rate and batches as the round, without its
    per-client work (reset, delta, clip, sum) and training metrics. ``prepare`` (untimed, as the round's own)
    reads the cohort's datasets into the tensors our round's shard gets (``cohort.shard_cohort``, one shard):
    every batch's rows and each step's size, in client order and as the clients batch them; step i trains on
    the next ``sizes[i]`` rows."""

    def __init__(self, task, cfg: TrainConfig):
        import tensorflow as tf

        from tff_pipeline import cohort

        model = _central_model(task, cfg)
        step = _central_step(model, task.loss(), cohort.client_learning_rate(cfg))

        @tf.function(reduce_retracing=True)
        def epoch(sizes, rows):
            x, y = rows
            begins = tf.cumsum(sizes, exclusive=True)
            for i in tf.range(tf.shape(sizes)[0]):
                tf.autograph.experimental.set_loop_options(parallel_iterations=1)  # one step after another
                begin, end = begins[i], begins[i] + sizes[i]
                step(tf.nest.map_structure(lambda t: t[begin:end], x), y[begin:end])

        self.epoch = epoch

    def prepare(self, datasets):
        from tff_pipeline import cohort

        _, sizes, rows = cohort.shard_cohort(datasets, 1)[0]
        return sizes, rows

    def __call__(self, prepared) -> None:
        self.epoch(*prepared)


def _count_examples(datasets) -> int:
    return int(sum(int(np.shape(x)[0]) for ds in datasets for x, _ in ds))


VARIANTS = ("pipeline", "per_client", "tff_stock", "central", "central_tfdata")
CENTRAL = ("central", "central_tfdata")  # Keras models: built after every TFF process (see _build_variants)


def measure(w: Workload, variants=("pipeline", "tff_stock", "central"), rounds: int = 10, log=print,
            workers=()) -> dict:
    """Median seconds per round (after one warm-up round) of each variant, the round-by-round ratio to central
    Keras with its spread, and the memory each variant added."""
    from tff_pipeline import mechanisms, runtime

    num_workers = runtime.install_context(workers)
    pcfg = mechanisms.resolve(w.cfg, w.task).mechanism
    sampler = pcfg.sampler(public_seed=w.cfg.seed)  # timing only: every variant replays the same cohorts
    cohorts = [sampler.sample(r) for r in range(1, rounds + 2)]
    out = {"workload": w.name, "description": w.description, "clients_per_round": w.clients_per_round,
           "population": w.task.population, "workers": list(workers) or ["local"],
           "rounds_measured": rounds, "variants": {}}
    mem = {v: {"build_mb": 0.0, "rounds_mb": 0.0} for v in variants}
    steps, build_s = _build_variants(w, pcfg, variants, num_workers, mem)
    times, first, examples, prepare = _time_rounds(w, steps, cohorts, mem, log)
    out["peak_rss_mb"] = rss = _peak_rss_mb(os.getpid()) + sum(_peak_rss_mb(p.pid) for p in runtime._processes)
    ex = statistics.median(examples)
    for variant in variants:
        med = statistics.median(times[variant])
        out["variants"][variant] = {"median_s_per_round": med, "examples_per_s": ex / med,
                                    "build_s": build_s[variant], "first_round_s": first[variant],
                                    # reading the cohort's datasets into the variant's input, outside the timing
                                    # (the limit's and our round's pre-batched tensors; none for the others)
                                    "prepare_s_per_round": statistics.median(prepare[variant]),
                                    "prepare_s": prepare[variant],
                                    "s_per_round": times[variant], "s_per_round_spread": spread(times[variant]),
                                    # resident memory added while this variant was built, and while its rounds
                                    # ran (summed positive growth): the variants share one process
                                    "memory_growth_mb": mem[variant]}
    _add_ratios(out["variants"])
    _log_results(w.name, out["variants"], log)
    log(f"{w.name:9s} peak RSS (Python + local worker) {rss:7.0f} MB")
    return out


def _build_variants(w: Workload, pcfg, variants, num_workers: int, mem: dict):
    """Each variant's round function and the seconds its build took (memory growth added to ``mem``)."""
    from tff_pipeline import cohort, dp_fedavg

    steps, build_s = {}, {}
    # Central's Keras model is built last, whatever the order asked for: building a TFF process makes Keras models
    # inside a tf.Graph, which invalidates every model made eagerly before it ("Your Layer or Model is in an
    # invalid state"). The rounds still run in the order asked for.
    for variant in sorted(variants, key=lambda v: v in CENTRAL):
        t0, m0 = time.monotonic(), _rss_mb()
        if variant == "central":
            steps[variant] = _CentralBatched(w.task, w.cfg)
        elif variant == "central_tfdata":
            steps[variant] = _central_round(w.task, w.cfg)
        else:
            if variant == "pipeline":
                process = cohort.build_process(w.task, w.cfg, pcfg)
            else:
                process = dp_fedavg.build_per_client_process(w.task, w.cfg, pcfg, guard=variant == "per_client")
            steps[variant] = _ProcessRound(process, variant == "pipeline", num_workers)
        build_s[variant] = time.monotonic() - t0
        mem[variant]["build_mb"] = _rss_mb() - m0
    return {v: steps[v] for v in variants}, build_s


def _time_rounds(w: Workload, steps: dict, cohorts, mem: dict, log):
    """Runs every variant on each round's cohort in turn; round 0 is the warm-up (tracing)."""
    times, prepare = {v: [] for v in steps}, {v: [] for v in steps}
    first, examples = {}, []
    for r, ids in enumerate(cohorts):
        if r:
            examples.append(_count_examples([w.task.client_dataset(int(i), r) for i in ids]))
        for variant, step in steps.items():
            # Each variant reads datasets made for it (untimed): a dataset's first read costs more than later
            # ones (keyboard's 200 clients: about 0.75 s against 0.3 s), so no variant reads another's.
            data = [w.task.client_dataset(int(i), r) for i in ids]
            t = time.monotonic()
            feed = step.prepare(data) if hasattr(step, "prepare") else data  # untimed, like building ``data``
            if r:
                prepare[variant].append(time.monotonic() - t)
            m0, t = _rss_mb(), time.monotonic()
            step(feed)
            dt = time.monotonic() - t
            mem[variant]["rounds_mb"] += max(0.0, _rss_mb() - m0)  # growth while this variant ran
            if r:
                times[variant].append(dt)
            else:
                first[variant] = dt
        log(f"{w.name:9s} round {r:3d} {len(ids):4d} clients  " +
            "  ".join(f"{v} {(times[v][-1] if r else first[v]):6.3f} s" for v in steps))
    return times, first, examples, prepare


def _add_ratios(variants: dict) -> None:
    c = variants.get("central", {}).get("median_s_per_round")
    if not c:
        return
    for v in variants.values():
        v["ratio_to_central"] = v["median_s_per_round"] / c
        # the same ratio round by round (both ran on that round's data), then the median: robust to drift
        ratios = [a / b for a, b in zip(v["s_per_round"], variants["central"]["s_per_round"])]
        v["median_ratio_per_round"] = statistics.median(ratios)
        v["ratio_per_round_spread"] = spread(ratios)  # the target is held on its median
        # the same with each side's untimed reading of the datasets (prepare) added: what a training run pays
        c_all = [a + b for a, b in zip(variants["central"]["s_per_round"], variants["central"]["prepare_s"])]
        ratios = [(a + b) / c for a, b, c in zip(v["s_per_round"], v["prepare_s"], c_all)]
        v["median_ratio_with_prepare"] = statistics.median(ratios)
        v["ratio_with_prepare_spread"] = spread(ratios)


def _log_results(name: str, variants: dict, log) -> None:
    for v, m in variants.items():
        log(f"{name:9s} {v:10s} {m['median_s_per_round']:7.3f} s/round  {m['examples_per_s']:9.0f} ex/s  "
            f"build {m['build_s']:5.1f} s  first round {m['first_round_s']:6.2f} s" +
            (f"  prepare {m['prepare_s_per_round']:.3f} s (untimed)" if m["prepare_s_per_round"] else "") +
            (f"  {m['ratio_to_central']:.2f}x central (round by round min/median/max "
             f"{m['ratio_per_round_spread']['min']:.2f}/{m['median_ratio_per_round']:.2f}/"
             f"{m['ratio_per_round_spread']['max']:.2f}x; with prepare "
             f"{m['ratio_with_prepare_spread']['min']:.2f}/{m['median_ratio_with_prepare']:.2f}/"
             f"{m['ratio_with_prepare_spread']['max']:.2f}x)" if "ratio_to_central" in m else "")
            + f"  memory +{m['memory_growth_mb']['build_mb']:.0f} MB build, +{m['memory_growth_mb']['rounds_mb']:.0f} MB rounds")


class _ProcessRound:
    """A TFF process's round. Our cohort process (``sharded``) gets the cohort as ``cohort.shard_cohort``'s
    pre-batched tensors, made in ``prepare`` (untimed, as the limit's ``_CentralBatched.prepare``; both read the
    same datasets once, and the bench records how long each took); TFF's per-client processes get the datasets."""

    def __init__(self, process, sharded: bool, num_workers: int):
        self.process, self.sharded, self.num_workers = process, sharded, num_workers
        self.state = process.initialize()
        if sharded:
            self.prepare = self._shards

    def _shards(self, datasets):
        from tff_pipeline import cohort

        return cohort.shard_cohort(datasets, self.num_workers)

    def __call__(self, data) -> None:
        from tff_pipeline import cohort

        if not self.sharded:
            data = [cohort.without_autotune(d) for d in data]  # every variant is fed alike
        self.state = self.process.next(self.state, data).state


def slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares line through (clients per round, s/round): (s per client, intercept s)."""
    x, y = np.array(points, dtype=float).T
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)
