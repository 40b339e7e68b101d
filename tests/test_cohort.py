"""The cohort round (tff_pipeline.cohort) is TFF's per-client DP-FedAvg round:
same clipping, clip update, noise and server step, only faster."""


import numpy as np
import pytest


def _make_client(i, round_seed):
    """Tabular clients of different sizes; every third client has no data."""
    rng = np.random.default_rng([i, 7])
    rows = 0 if i % 3 == 0 else 5 + 4 * (i % 5)
    x = rng.normal(size=(rows, 6)).astype(np.float32)
    y = (x[:, :2].sum(1) > 0).astype(np.float32)[:, None]
    return x, y


@pytest.fixture(scope="module")
def small():
    import tensorflow as tf

    from tff_pipeline import bench, models, runtime
    from tff_pipeline.config import make

    def build():
        inp = tf.keras.Input(shape=(6,), dtype=tf.float32)
        x = tf.keras.layers.Reshape((6, 1))(inp)
        x = tf.keras.layers.Dense(8)(x)
        x = models.transformer_block(x, 8, 2, 16, 0.0, causal=False, name="block0")
        x = tf.keras.layers.GlobalAveragePooling1D()(x)
        return tf.keras.Model(inp, tf.keras.layers.Dense(1)(x))

    task = bench._synthetic_task("small", build, lambda: tf.keras.losses.BinaryCrossentropy(from_logits=True),
                                 _make_client, 30, 4)
    runtime.install_context()
    cfg = make(task="small", clients_per_round=8, sampling="fixed", noise_multiplier=0.0, batch_size=4,
               client_learning_rate=0.2, server_optimizer="sgdm", server_learning_rate=1.0, server_momentum=0.5,
               initial_clip=0.05)
    return task, cfg


def _pcfg(cfg, task):
    from tff_pipeline import mechanisms

    return mechanisms.resolve(cfg, task).mechanism


def test_shards_keep_clients_whole_in_order_and_give_empty_clients_one_empty_batch():
    import tensorflow as tf

    from tff_pipeline import cohort

    datasets = [tf.data.Dataset.from_tensor_slices(np.full((n, 2), i, np.float32)).batch(2) for i, n in
                enumerate([3, 0, 4, 1, 2])]
    shards = cohort.shard_cohort(datasets, 2)
    assert len(shards) == 2

    def steps(shard):  # (slot, size, first value of the step's batch) per step
        slots, sizes, rows = shard
        begins = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return [(int(s), int(n), float(rows[b, 0]) if n else None) for s, n, b in zip(slots, sizes, begins)]

    assert [steps(s) for s in shards] == [[(0, 2, 0.0), (0, 1, 0.0), (1, 0, None)],
                                          [(2, 2, 2.0), (2, 2, 2.0), (3, 1, 3.0), (4, 2, 4.0)]]
    assert shards[0][2].shape == (3, 2) and shards[0][0].dtype == shards[0][1].dtype == np.int32
    assert len(cohort.shard_cohort(datasets, 9)) == 5 and cohort.shard_cohort([], 2) == []
    empty, = cohort.empty_shards(datasets[0].element_spec)
    assert empty[0].shape == empty[1].shape == (0,) and empty[2].shape == (0, 2)
    # Structures and strings (the medical task's features), typed as the shard type says.
    words = [tf.data.Dataset.from_tensor_slices(({"w": np.array([b"a", b"bb", b"c"])}, np.arange(3.0))).batch(2)]
    (_, sizes, (feats, y)), = cohort.shard_cohort(words, 1)
    assert sizes.tolist() == [2, 1] and feats["w"].tolist() == [b"a", b"bb", b"c"] and y.tolist() == [0, 1, 2]
    spec = cohort.shard_spec(words[0].element_spec)
    assert spec[2][0]["w"].shape.as_list() == [None] and spec[2][1].dtype == tf.float64


def test_shards_are_read_with_tf_data_autotuning_off(monkeypatch):
    """Every shard is read through cohort.without_autotune (README, "Speed": with autotuning on, about one
    round in three stalled for 5-10 s)."""
    import tensorflow as tf

    from tff_pipeline import cohort

    seen = []
    real = cohort._read
    monkeypatch.setattr(cohort, "_read", lambda ds: seen.append(ds.options().autotune.enabled) or real(ds))
    datasets = [tf.data.Dataset.from_tensor_slices(np.ones((n, 2), np.float32)).batch(2) for n in (3, 2, 4)]
    assert datasets[0].options().autotune.enabled is not False  # TF's default: on
    assert len(cohort.shard_cohort(datasets, 2)) == 2
    assert seen == [False, False]


def test_cohort_round_equals_tff_per_client_round_without_noise(small):
    """Noise off, so the rounds are deterministic: four rounds of TFF's own
    build_unweighted_fed_avg + gaussian_adaptive and of ours (the cohort split
    into 1 and into 3 shards) give the same weights, adaptive clip and loss.
    Cohorts include clients without data."""
    from tff_pipeline import cohort, dp_fedavg

    task, cfg = small
    pcfg = _pcfg(cfg, task)
    stock = dp_fedavg.build_per_client_process(task, cfg, pcfg, guard=False)  # TFF's own round, nothing of ours
    ours = cohort.build_process(task, cfg, pcfg)
    s_stock = stock.initialize()
    states = {n: ours.set_model_weights(ours.initialize(), stock.get_model_weights(s_stock)) for n in (1, 3)}
    for r in range(1, 5):
        ids = [(7 * r + j) % 30 for j in range(8)]  # eight consecutive clients: two or three have no data
        data = [task.client_dataset(int(i), r) for i in ids]
        out_stock = stock.next(s_stock, data)
        s_stock = out_stock.state
        want = stock.get_model_weights(s_stock).trainable
        for n in (1, 3):
            out = ours.next(states[n], cohort.shard_cohort(data, n))
            states[n] = out.state
            for a, b in zip(ours.get_model_weights(out.state).trainable, want):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
            got_m, want_m = out.metrics, out_stock.metrics
            assert got_m["aggregator"]["dp_query_metrics"]["clip"] == pytest.approx(
                want_m["aggregator"]["dp_query_metrics"]["clip"], rel=1e-6)
            for k in ("loss", "num_examples", "num_batches"):
                assert got_m["client_work"]["train"][k] == pytest.approx(want_m["client_work"]["train"][k], rel=1e-5)
            assert got_m["client_work"]["clients"] == len(ids)
            assert got_m["aggregator"]["non_finite_updates_zeroed"] == sum(1 for i in ids if i % 3 == 0)
    clip = out.metrics["aggregator"]["dp_query_metrics"]["clip"]
    assert clip != pytest.approx(cfg.privacy.initial_clip)  # the clip did adapt


def test_noise_is_one_gaussian_draw_on_the_sum_at_tff_scale(small):
    """A cohort of clients without data sends zero updates, so the server
    step (SGD, lr 1, no momentum) moves the model by the noise alone: each
    coordinate N(0, (z_eff · clip / expected cohort)²), with z_eff TFF's
    adaptive-clipping value noise for z = 1 and σ_b = 2."""
    from tff_pipeline import cohort

    task, cfg = small
    cfg = cfg.replace(noise_multiplier=1.0, clipped_count_stddev=2.0, server_momentum=0.0)
    pcfg = _pcfg(cfg, task)
    process = cohort.build_process(task, cfg, pcfg)
    state = process.initialize()
    before = np.concatenate([np.ravel(w) for w in process.get_model_weights(state).trainable])
    data = [task.client_dataset(i, 1) for i in (0, 3, 6, 9, 12, 15, 18, 21)]
    out = process.next(state, cohort.shard_cohort(data, 2))
    after = np.concatenate([np.ravel(w) for w in process.get_model_weights(out.state).trainable])
    z_eff = (1.0 ** -2 - (2 * 2.0) ** -2) ** -0.5
    expected = z_eff * cfg.privacy.initial_clip / 8
    assert before.size > 500
    assert np.std(after - before) == pytest.approx(expected, rel=0.08)
    assert abs(np.mean(after - before)) < 4 * expected / np.sqrt(before.size)
    # The round reports the noise norm it expected (σ·√d / m, from the query) and the norm of the update it
    # released; with no signal they agree, and the signal estimate is small next to the noise.
    from tff_pipeline.mechanisms.dp_fedavg import train_metrics

    q = out.metrics["aggregator"]["dp_query_metrics"]
    assert q["expected_noise_norm"] == pytest.approx(expected * np.sqrt(before.size), rel=1e-5)
    assert q["update_norm"] == pytest.approx(np.linalg.norm(after - before), rel=1e-4)
    assert q["update_norm"] == pytest.approx(q["expected_noise_norm"], rel=0.08)
    flat = {f"aggregator/dp_query_metrics/{k}": v for k, v in q.items()}
    assert train_metrics(flat)["signal_norm_estimate"] < 0.5 * q["expected_noise_norm"]


def test_an_update_whose_norm_overflows_is_zeroed():
    import tensorflow as tf

    from tff_pipeline import dp_fedavg

    big = [tf.constant([3e19, 3e19], tf.float32)]
    assert np.isfinite(big[0].numpy()).all() and not np.isfinite(tf.linalg.global_norm(big).numpy())
    assert not bool(dp_fedavg.is_usable_update(big)) and bool(dp_fedavg.is_usable_update([tf.constant([3e9, 1.0])]))
    # Without the guard, clipping such an update gives NaN: that is what would reach the model.
    clipped, _ = tf.clip_by_global_norm(big, 1.0)
    assert np.isnan(clipped[0].numpy()).all()


def test_a_nan_or_inf_entry_makes_an_update_unusable():
    import tensorflow as tf

    from tff_pipeline import dp_fedavg

    for bad in (np.nan, np.inf, -np.inf):
        assert not bool(dp_fedavg.is_usable_update([tf.constant([1.0, 2.0]), tf.constant([0.5, bad], tf.float32)]))
    assert bool(dp_fedavg.is_usable_update([tf.constant([1.0, 2.0]), tf.zeros([3])]))


def test_the_token_loss_taken_from_the_batch_loss_is_the_metric():
    """The cohort step adds the keyboard's token loss from the batch loss it already has (no second softmax):
    the same totals as the metric's own update, for the loss it equals and no other."""
    import tensorflow as tf

    from tff_pipeline import models

    rng = np.random.default_rng(3)
    logits = tf.constant(rng.normal(size=(4, 7, 50)) * 3, tf.float32)
    y = rng.integers(1, 50, size=(4, 7)).astype(np.int32)
    y[:, 5:] = 0  # padding
    y[3] = 0  # a row of padding only
    own, taken = models.MaskedTokenLoss(0), models.MaskedTokenLoss(0)
    loss_fn = models.MaskedSparseCrossEntropy(0)
    assert taken.same_as_loss(loss_fn)
    assert not taken.same_as_loss(models.MaskedSparseCrossEntropy(1))
    assert not taken.same_as_loss(tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for rows in (slice(0, 2), slice(2, 4), slice(3, 4)):
        own.update_state(y[rows], logits[rows])
        taken.update_from_loss(y[rows], loss_fn(y[rows], logits[rows]))
    for a, b in zip(own.variables, taken.variables):
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-6)
    assert own.count.numpy() == (y != 0).sum()


def test_clients_with_overflowing_updates_leave_the_model_finite(small):
    """Clients with one batch each and a client learning rate of 1e25: one
    SGD step gives a delta with finite entries whose L2 norm overflows
    float32 (checked below with plain Keras). Such updates are zeroed and
    counted; the model stays finite (noise off: unchanged)."""
    import tensorflow as tf

    from tff_pipeline import bench, cohort

    small_task, cfg = small
    task = bench._synthetic_task("one_batch", small_task.build_model, small_task.loss, _make_client, 30, 64)
    cfg = cfg.replace(client_learning_rate=1e25)
    process = cohort.build_process(task, cfg, _pcfg(cfg, task))
    state = process.initialize()
    before = process.get_model_weights(state).trainable
    ids = [1, 2, 4, 5]  # all with data, one batch each
    # The precondition, computed apart: every client's delta is finite entry by entry, its norm is not.
    model = task.build_model()
    for v, w in zip(model.trainable_variables, before):
        v.assign(w)
    for i in ids:
        (x, y), = list(task.client_dataset(i, 1))
        with tf.GradientTape() as tape:
            loss = task.loss()(y, model(x, training=True))
        delta = [1e25 * g for g in tape.gradient(loss, model.trainable_variables)]
        assert all(np.isfinite(d.numpy()).all() for d in delta) and not np.isfinite(tf.linalg.global_norm(delta))
    out = process.next(state, cohort.shard_cohort([task.client_dataset(i, 1) for i in ids], 2))
    after = process.get_model_weights(out.state).trainable
    for a, b in zip(after, before):
        assert np.isfinite(a).all()
        np.testing.assert_allclose(a, b)
    assert out.metrics["aggregator"]["non_finite_updates_zeroed"] == len(ids)


def test_an_empty_cohort_is_a_noise_only_round(small):
    """Poisson sampling can draw nobody. The round still runs: no update,
    the noise at the same scale as any round, and the clip update."""
    from tff_pipeline import cohort

    task, cfg = small
    cfg = cfg.replace(noise_multiplier=1.0, clipped_count_stddev=2.0, server_momentum=0.0)
    process = cohort.build_process(task, cfg, _pcfg(cfg, task))
    state = process.initialize()
    before = np.concatenate([np.ravel(w) for w in process.get_model_weights(state).trainable])
    out = process.next(state, cohort.empty_shards(task.element_spec))
    after = np.concatenate([np.ravel(w) for w in process.get_model_weights(out.state).trainable])
    assert out.metrics["client_work"]["clients"] == 0
    expected = (1.0 ** -2 - (2 * 2.0) ** -2) ** -0.5 * cfg.privacy.initial_clip / 8
    assert np.std(after - before) == pytest.approx(expected, rel=0.08)
    # The same state and the same (empty) input again: a different draw. The noise comes from OS-seeded random
    # ops, not from --seed or anything else the outputs contain.
    again = np.concatenate([np.ravel(w) for w in process.get_model_weights(
        process.next(state, cohort.empty_shards(task.element_spec)).state).trainable])
    assert np.abs(again - after).max() > expected


def test_dp_ftrl_tree_noise_comes_from_the_given_secret_seeds_and_restarts(small):
    """DP-FTRL's round on clients without data: the server step (SGD, lr 1, no momentum) moves the model by
    the tree noise alone. The first leaf's noise has std z·C/cohort per coordinate; the noise is a function
    of the seeds restart_tree installs (the same seeds give the same noise, others other noise), never of
    TFF's clock-derived default seed."""
    from tff_pipeline import cohort
    from tff_pipeline.mechanisms import DPFTRL

    task, cfg = small
    cfg = cfg.replace(server_momentum=0.0)
    mech = DPFTRL(task.population, 8, 2.0, 1e-5, l2_norm_clip=0.05)
    process = mech.build_process(task, cfg)
    data = cohort.shard_cohort([task.client_dataset(i, 1) for i in (0, 3, 6, 9, 12, 15, 18, 21)], 2)
    start = process.initialize()
    w0 = np.concatenate([np.ravel(w) for w in process.get_model_weights(start).trainable])

    def step(seeds):
        state = process.restart_tree(start, np.array(seeds, np.int64))
        out = process.next(state, data).state
        return np.concatenate([np.ravel(w) for w in process.get_model_weights(out).trainable]) - w0

    a, b, c = step([11, 12]), step([11, 12]), step([13, 14])
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.std(a) == pytest.approx(2.0 * 0.05 / 8, rel=0.08)


def test_a_shard_is_one_while_loop_over_tensors(small):
    """The worker trains a shard in one traced while loop over its pre-batched tensors: no dataset op at all
    (a ReduceDataset instantiated the training step on every call: 0.2 s of a 0.37 s medical round; a
    concatenation of the cohort's datasets cost about 4% of a round, README "Speed")."""
    import tensorflow_federated as tff

    from tff_pipeline import cohort

    task, cfg = small
    proto = tff.framework.ConcreteComputation.get_proto(cohort.build_process(task, cfg, _pcfg(cfg, task)).next)
    graphs = proto.SerializeToString()
    assert b"Dataset" not in graphs and b"IteratorGetNext" not in graphs
    assert b"While" in graphs


def test_fedatt_cohort_round_equals_tff_fed_avg_with_the_fedatt_factory(small):
    """--aggregation=attentive: three rounds of our cohort process (one client per shard) and of TFF's own
    build_unweighted_fed_avg with the FedAtt aggregation factory as its model_aggregator give the same weights;
    the clients' distances differ, so the attention weights are not uniform (and the result is not FedAvg's)."""
    import tensorflow_federated as tff

    from tff_pipeline import cohort, dp_fedavg, fedatt

    task, cfg = small
    cfg = cfg.replace(aggregation="attentive", attention_temperature=0.2)
    mech = _pcfg(cfg, task)
    assert mech.one_client_per_shard and not mech.is_private
    stock = tff.learning.algorithms.build_unweighted_fed_avg(
        dp_fedavg.model_fn_for(task, ()),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_learning_rate),
        server_optimizer_fn=dp_fedavg.server_optimizer(cfg),
        model_aggregator=fedatt.build_factory(0.2))
    mean = dp_fedavg.build_per_client_process(task, cfg.replace(aggregation="mean", initial_clip=1e6,
                                                                clip_learning_rate=0.0), _pcfg(
        cfg.replace(aggregation="mean", initial_clip=1e6, clip_learning_rate=0.0), task), guard=False)
    ours = cohort.build_process(task, cfg, mech)
    s_stock = stock.initialize()
    s_ours = ours.set_model_weights(ours.initialize(), stock.get_model_weights(s_stock))
    s_mean = mean.set_model_weights(mean.initialize(), stock.get_model_weights(s_stock))
    for r in range(1, 4):
        ids = [(5 * r + j) % 30 for j in range(8)]
        data = [task.client_dataset(int(i), r) for i in ids]
        out_stock = stock.next(s_stock, data)
        out = ours.next(s_ours, cohort.shard_cohort(data, len(data)))
        s_stock, s_ours = out_stock.state, out.state
        for a, b in zip(ours.get_model_weights(s_ours).trainable, stock.get_model_weights(s_stock).trainable):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)  # float order differs; exp(s/T) scales it by 1/T
        att = out.metrics["aggregator"]["fedatt"]
        assert att == pytest.approx(out_stock.metrics["aggregator"], rel=1e-4)
        assert 1.0 < att["effective_clients"] < 7.9 and att["max_weight"] > 1 / 8 + 0.01  # not uniform
        if r == 1:  # from the same start, FedAvg's unweighted mean (no clipping at this clip) differs
            m = mean.next(s_mean, data)
            gap = max(float(np.abs(a - b).max()) for a, b in zip(
                mean.get_model_weights(m.state).trainable, ours.get_model_weights(s_ours).trainable))
            assert gap > 1e-4


def test_reptile_clients_take_exactly_the_personalization_steps(small):
    """--meta_learning=reptile: every client with data runs exactly --personalize_steps SGD steps (cycling over
    its batches) at --personalize_learning_rate; one without data stays empty. Its adapted delta is clipped and
    noised like any update, so the round's DP query is unchanged."""
    from tff_pipeline import cohort

    task, cfg = small
    cfg = cfg.replace(meta_learning="reptile", personalize_steps=7, personalize_learning_rate=0.05)
    assert cohort.client_learning_rate(cfg) == 0.05
    ids = [0, 1, 2, 4]  # client 0 has no data; the others have 1-4 batches of 4
    data = [cohort.reptile_steps(task.client_dataset(i, 1), 7) for i in ids]
    assert [sum(1 for _ in d) for d in data] == [0, 7, 7, 7]
    process = cohort.build_process(task, cfg, _pcfg(cfg, task))
    out = process.next(process.initialize(), cohort.shard_cohort(data, 2))
    assert out.metrics["client_work"]["train"]["num_batches"] == 21
    assert "clip" in out.metrics["aggregator"]["dp_query_metrics"]
