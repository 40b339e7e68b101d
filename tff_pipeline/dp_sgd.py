"""Example-level DP: DP-SGD inside each client, as a TFF ClientWorkProcess.

Each round, each client takes ``local_steps`` DP-SGD steps (Abadi et al. 2016,
https://arxiv.org/abs/1607.00133) from the broadcast model: every step draws
its batch by Poisson sampling (each of the client's n examples joins with
probability q = batch_size / n, exactly as ``privacy.ExampleLevelConfig``
accounts it), clips each example's gradient to L2 norm ``l2_norm_clip``,
sums, adds Gaussian noise N(0, (z · clip)²) per coordinate, and divides by
the expected batch size (tensorflow-privacy's ``GaussianSumQuery`` semantics,
the same as its DP Keras optimizers). The client sends its model delta; the
server averages the deltas (unweighted) and applies them.

TFF composes it: ``compose_learning_process(distributor, this client work,
MeanFactory aggregator with client weights 1 (an unweighted mean), optimizer finalizer)``.

Batch sampling and noise seeds come from unseeded stateful random ops, which
TF seeds from the OS: they differ every round and are not derivable from the
run's seed or from any output.
"""

from __future__ import annotations

import collections

import numpy as np


def _per_example_gradients(model, loss_obj, trainable, xb, yb, rows_per_record: int = 1):
    """Each record's gradient (of the mean loss of its ``rows_per_record`` consecutive rows) and its L2 norm, by
    ``tf.vectorized_map`` over the records (one gradient per record, vectorised: as fast as one batch gradient on
    the traffic model, where ``tape.jacobian`` of the per-record losses was 30x slower). A record whose gradient has
    NaN/Inf gets a zero gradient and norm (a function of that record alone: the sensitivity, hence the guarantee,
    is unchanged); returns also how many there were, for the operator."""
    import tensorflow as tf

    k = rows_per_record
    xr = tf.reshape(xb, tf.concat([[-1, k], tf.shape(xb)[1:]], 0))
    yr = tf.reshape(yb, tf.concat([[-1, k], tf.shape(yb)[1:]], 0))

    def record_gradient(record):
        x1, y1 = record
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_obj(y1, model.predict_on_batch(x1, training=True)))
        grads = tape.gradient(loss, trainable, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.convert_to_tensor(g) for g in grads]

    m = tf.shape(xr)[0]
    jac = tf.cond(m > 0, lambda: tf.vectorized_map(record_gradient, (xr, yr), fallback_to_while_loop=True),
                  lambda: [tf.zeros([0] + v.shape.as_list()) for v in trainable])  # an empty Poisson batch
    norms = tf.sqrt(tf.add_n([tf.reduce_sum(tf.reshape(j, [m, -1]) ** 2, axis=1) for j in jac]))
    ok = tf.math.is_finite(norms)
    jac = [tf.where(tf.reshape(ok, [-1] + [1] * (len(v.shape))), j, tf.zeros_like(j)) for v, j in zip(trainable, jac)]
    return jac, tf.where(ok, norms, 0.0), tf.reduce_sum(tf.cast(tf.logical_not(ok), tf.float32))


def _dp_sgd_step(model, loss_obj, trainable, x, y, q, seeds, step, *, learning_rate, l2_norm_clip, noise_multiplier,
                 expected_batch_size, rows_per_record: int = 1):
    """One DP-SGD step (Abadi et al. 2016) in place on ``trainable``: a Poisson-sampled batch (each example joins
    with probability q; its size is random), per-example clipping to ``l2_norm_clip``, Gaussian noise of std
    ``noise_multiplier`` × clip, divided by the expected batch size. With ``rows_per_record`` > 1 the sampled and
    clipped unit is a record of that many consecutive rows. Returns (fraction clipped, non-finite count)."""
    import tensorflow as tf

    seed0, seed1 = seeds
    records = tf.shape(x)[0] // rows_per_record
    take = tf.random.stateless_uniform([records], seed=tf.stack([seed0, seed1 + step * 7919])) < q
    if rows_per_record > 1:
        take = tf.repeat(take, rows_per_record)
    xb, yb = tf.boolean_mask(x, take), tf.boolean_mask(y, take)
    jac, norms, non_finite = _per_example_gradients(model, loss_obj, trainable, xb, yb, rows_per_record)
    factor = tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
    clipped = tf.reduce_mean(tf.cast(norms > l2_norm_clip, tf.float32)) if tf.shape(norms)[0] > 0 else 0.0
    for i, (v, j) in enumerate(zip(trainable, jac)):
        noise = tf.random.stateless_normal(tf.shape(v), seed=tf.stack([seed0 + i + 1, seed1 + step * 7919]),
                                           stddev=noise_multiplier * l2_norm_clip)
        v.assign_sub(learning_rate * (tf.tensordot(factor, j, axes=1) + noise) / expected_batch_size)
    return clipped, non_finite


def _as_client_work(model_fn, make_update):
    """The ClientWorkProcess around ``make_update()`` (a tf.function (initial weights, client dataset) -> (client
    result, unfinalized metrics, fraction clipped, non-finite count)): TFF maps it over the clients and sums the
    operator-side measurements."""
    import tensorflow as tf
    import tensorflow_federated as tff

    with tf.Graph().as_default():
        model = model_fn()
        metrics_agg = tff.learning.metrics.sum_then_finalize(model.metric_finalizers())
    data_type = tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec))
    weights_type = tff.learning.models.weights_type_from_model(model)

    @tff.tensorflow.computation(weights_type, data_type)
    def client_update(initial_weights, dataset):
        return make_update()(initial_weights, dataset)

    @tff.federated_computation
    def init_fn():
        return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state, weights, data):
        result, model_out, clipped, non_finite = tff.federated_map(client_update, (weights, data))
        measurements = tff.federated_zip(collections.OrderedDict(
            train=metrics_agg(model_out), fraction_clipped=tff.federated_mean(clipped),
            non_finite_examples_zeroed=tff.federated_sum(non_finite)))
        return tff.templates.MeasuredProcessOutput(state, result, measurements)

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def build_client_work(model_fn, loss_fn, *, learning_rate: float, l2_norm_clip: float, noise_multiplier: float,
                      local_steps: int, expected_batch_size: int, sampling_rate=None, rows_per_record: int = 1):
    """DP-SGD client work. Every client's expected batch is ``expected_batch_size`` (q = it / the client's records),
    or, with ``sampling_rate``, q = sampling_rate in every client (expected batch q × its records). A record is
    ``rows_per_record`` consecutive rows of the client's data (traffic: a block of days), sampled and clipped
    together."""
    import tensorflow as tf
    import tensorflow_federated as tff

    step_args = dict(learning_rate=learning_rate, l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
                     rows_per_record=rows_per_record)

    def make_update():
        model = model_fn()
        loss_obj = loss_fn()
        loss_obj.reduction = tf.keras.losses.Reduction.NONE

        @tf.function  # automatic control dependencies: every assignment runs, in order
        def update(initial_weights, dataset):
            weights = tff.learning.models.ModelWeights.from_model(model)
            tf.nest.map_structure(lambda a, b: a.assign(b), weights, initial_weights)
            x, y = tf.data.experimental.get_single_element(dataset)  # the whole client, one element
            n = tf.cast(tf.shape(x)[0] // rows_per_record, tf.float32)  # records
            if sampling_rate is None:
                q, batch = tf.minimum(1.0, expected_batch_size / n), tf.constant(float(expected_batch_size))
            else:  # the client's size is public (the report says so); q is the same in every client
                q, batch = tf.constant(float(sampling_rate)), float(sampling_rate) * n
            # Secret per call: unseeded stateful ops draw their seeds from the OS (TFF traces in graphs with no
            # graph-level seed, so --seed does not reach them).
            seeds = (tf.random.uniform([], 0, 2**62, dtype=tf.int64), tf.random.uniform([], 0, 2**62, dtype=tf.int64))
            clipped, non_finite = tf.constant(0.0), tf.constant(0.0)
            for step in tf.range(local_steps, dtype=tf.int64):
                c, nf = _dp_sgd_step(model, loss_obj, weights.trainable, x, y, q, seeds, step,
                                     expected_batch_size=batch, **step_args)
                clipped, non_finite = clipped + c, non_finite + nf
            # Metrics of the local model on the client's data (operator-side, not private).
            model.forward_pass((x, y), training=False)
            delta = tf.nest.map_structure(tf.subtract, initial_weights.trainable, weights.trainable)
            result = tff.learning.templates.ClientResult(update=delta, update_weight=tf.constant(1.0))
            return result, model.report_local_unfinalized_metrics(), clipped / float(local_steps), non_finite

        return update

    return _as_client_work(model_fn, make_update)


def _composed(task, cfg, frozen, client_work_for, aggregation_factory):
    """TFF's learning process from its broadcast distributor, ``client_work_for(model_fn)``, the weighted
    ``aggregation_factory`` over the trainable weights and TFF's optimizer finalizer (``cfg``'s server optimizer)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg

    model_fn = dp_fedavg.model_fn_for(task, frozen)
    with tf.Graph().as_default():
        weights_type = tff.learning.models.weights_type_from_model(model_fn())

    @tff.tensorflow.computation
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    aggregator = aggregation_factory.create(weights_type.trainable, tff.TensorType(np.float32))
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(dp_fedavg.server_optimizer(cfg), weights_type)
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    return tff.learning.templates.compose_learning_process(initial_weights, distributor, client_work_for(model_fn),
                                                           aggregator, finalizer)


def build_process(task, cfg, mech, frozen=()):
    """The example-level DP learning process for ``task``: clip, noise, steps and batch size are those of ``mech``
    (a DPSGDInClient), the mechanism the accounting describes. The server takes the unweighted mean of the
    clients' deltas (a weighted mean with every client weight 1.0)."""
    import tensorflow_federated as tff

    return _composed(task, cfg, frozen, lambda model_fn: build_client_work(
        model_fn, task.loss, learning_rate=cfg.client_learning_rate, l2_norm_clip=mech.l2_norm_clip,
        noise_multiplier=mech.noise_multiplier, local_steps=mech.local_steps, expected_batch_size=mech.batch_size,
        sampling_rate=mech.sampling_rate, rows_per_record=task.rows_per_record), tff.aggregators.MeanFactory())


def build_clipped_sum_client_work(model_fn, loss_fn, *, l2_norm_clip: float, sampling_rate: float,
                                  rows_per_record: int = 1):
    """Client work of DP-SGD with the noise added by the server (``mechanisms.DPSGDServerNoise``): the client
    Poisson-samples each of its records with probability ``sampling_rate`` (unseeded: secret), clips each record's
    gradient at the broadcast model to ``l2_norm_clip`` and sends the sum, without noise and without dividing."""
    import tensorflow as tf
    import tensorflow_federated as tff

    def make_update():
        model = model_fn()
        loss_obj = loss_fn()
        loss_obj.reduction = tf.keras.losses.Reduction.NONE

        @tf.function
        def update(initial_weights, dataset):
            weights = tff.learning.models.ModelWeights.from_model(model)
            tf.nest.map_structure(lambda a, b: a.assign(b), weights, initial_weights)
            x, y = tf.data.experimental.get_single_element(dataset)  # the whole client, one element
            records = tf.shape(x)[0] // rows_per_record
            take = tf.random.uniform([records]) < sampling_rate  # OS-seeded: secret, new every call
            if rows_per_record > 1:
                take = tf.repeat(take, rows_per_record)
            xb, yb = tf.boolean_mask(x, take), tf.boolean_mask(y, take)
            jac, norms, non_finite = _per_example_gradients(model, loss_obj, weights.trainable, xb, yb,
                                                            rows_per_record)
            factor = tf.minimum(1.0, l2_norm_clip / tf.maximum(norms, 1e-12))
            clipped = tf.reduce_mean(tf.cast(norms > l2_norm_clip, tf.float32)) if tf.shape(norms)[0] > 0 else 0.0
            total = [tf.reshape(tf.tensordot(factor, j, axes=1), v.shape) for v, j in zip(weights.trainable, jac)]
            model.forward_pass((x, y), training=False)  # operator-side metrics of the broadcast model
            result = tff.learning.templates.ClientResult(
                update=tf.nest.pack_sequence_as(initial_weights.trainable, total), update_weight=tf.constant(1.0))
            return result, model.report_local_unfinalized_metrics(), clipped, non_finite

        return update

    return _as_client_work(model_fn, make_update)


def server_gaussian_sum_factory(stddev: float, divisor: float):
    """A TFF aggregation factory: the sum over clients of their (already clipped) values, plus Gaussian noise of
    ``stddev`` per coordinate drawn once on the server (OS-seeded), divided by ``divisor`` (the expected number of
    sampled records: q × every client's records, public sizes). Client weights are ignored (every client sends a
    sum, weight 1). Its measurements: the released vector's norm and the norm the noise alone would have, both
    post-processing of released values and public settings."""
    import tensorflow as tf
    import tensorflow_federated as tff

    class ServerGaussianSum(tff.aggregators.WeightedAggregationFactory):
        def create(self, value_type, weight_type):
            @tff.federated_computation
            def init_fn():
                return tff.federated_value((), tff.SERVER)

            @tff.tensorflow.computation(value_type)
            def noised_mean(total):
                leaves = [t + tf.random.normal(tf.shape(t), stddev=stddev, dtype=t.dtype)
                          for t in tf.nest.flatten(total)]
                out = [t / divisor for t in leaves]
                d = float(sum(int(np.prod(t.shape)) for t in leaves))
                norms = collections.OrderedDict(update_norm=tf.linalg.global_norm(out),
                                                expected_noise_norm=tf.constant(stddev * d**0.5 / divisor,
                                                                                tf.float32))
                return tf.nest.pack_sequence_as(total, out), norms

            @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS),
                                       tff.FederatedType(weight_type, tff.CLIENTS))
            def next_fn(state, value, weight):
                del weight
                result, norms = tff.federated_map(noised_mean, tff.federated_sum(value))
                return tff.templates.MeasuredProcessOutput(state, result, norms)

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return ServerGaussianSum()


def build_server_noise_process(task, cfg, mech, frozen=()):
    """DP-SGD over every client's records with the noise added once by the server (``mech``, a DPSGDServerNoise):
    one step per round; the clients send clipped sums, the server adds N(0, (z·C)²), divides by q × all records
    and applies the server optimizer to that noisy mean gradient (its learning rate is DP-SGD's)."""
    return _composed(task, cfg, frozen, lambda model_fn: build_clipped_sum_client_work(
        model_fn, task.loss, l2_norm_clip=mech.l2_norm_clip, sampling_rate=mech.sampling_rate,
        rows_per_record=task.rows_per_record),
        server_gaussian_sum_factory(mech.noise_multiplier * mech.l2_norm_clip, mech.expected_batch))
