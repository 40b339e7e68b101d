"""DP-FedAvg with adaptive clipping, one TF computation per cohort shard.

The same algorithm as TFF's ``build_unweighted_fed_avg`` with the
``gaussian_adaptive`` DP aggregator (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963; adaptive clipping of Andrew et al. 2021,
https://arxiv.org/abs/1905.03871), run so that TFF's per-client cost goes:

* The cohort is split into ``num_shards`` shards (one per TFF worker). A shard
  is one CLIENTS-placed structure of tensors: each step's client slot and
  batch size, and the batches' rows (``shard_cohort``).
* In one TF computation per shard, each client in turn starts from the
  broadcast model, trains locally (SGD, one pass over its own batches, as
  TFF's model-delta client work), and its delta is zeroed if it or its norm
  is not finite, then clipped with the DP query's ``preprocess_record``. That is per-client
  clipping at the adaptive norm, plus the client's unclipped indicator. The
  shard returns the sum of its clients' records.
* TFF sums the shards (``federated_sum``). The server draws the noise once on
  the sum and updates the clip with the query's ``get_noised_result``.

The query is the very ``tensorflow_privacy`` object that TFF's
``DifferentiallyPrivateFactory.gaussian_adaptive`` builds, so the clip,
noise, normalisation by the expected cohort and clip update are TFF's.
A shard's records are summed, and the query's ``merge_sample_states`` for
these queries is addition too, so the sharding changes only the order of
floating-point additions.

TFF orchestrates all of it. The process is a
``tff.learning.templates.LearningProcess``, made from TFF's broadcast
distributor, this cohort part, and TFF's optimizer finalizer. Its state is
``LearningAlgorithmState``. Client training and DP aggregation form one
part: a client's delta must be clipped with the aggregator's current clip
before it joins the shard's sum, and ``compose_learning_process`` gives
client work no view of aggregator state.
"""

from __future__ import annotations

import collections
import functools

import numpy as np

from tff_pipeline.config import TrainConfig


def without_autotune(ds):
    """``ds`` with tf.data's autotuning off (every client dataset we read). With it on (TF 2.14's default), about
    one round in three of a cohort's pass stalled for 5-10 s with every thread of the process asleep, in the worker
    and in plain Keras alike; our datasets have no parallel or prefetch stage for autotuning to size (README,
    "Speed")."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


def shard_cohort(datasets, num_shards: int):
    """The cohort's per-client datasets as ``num_shards`` shards of tensors, read here in one traced pass per
    shard (README, "Speed": the worker's loop over tensors is faster than over a concatenation of datasets, and
    a traced read costs half an eager one). A shard is ``(slots, sizes, rows)``: step i trains on the next
    ``sizes[i]`` rows of ``rows`` (the task's element structure, its batches concatenated) for the client in
    cohort position ``slots[i]``. Clients stay whole and in order, their batches as their datasets give them,
    and shard sizes differ by at most one client. A client without data still sends a (zero) update, as in
    TFF's per-client round: it gets one empty step (size 0). An empty cohort gives an empty list."""
    import tensorflow as tf

    n = len(datasets)
    if not n:
        return []
    k = max(1, min(num_shards, n))
    spec = datasets[0].element_spec
    counts = [_num_batches(d) for d in datasets]
    datasets = [d if c else tf.data.Dataset.from_tensors(_empty_batch(spec)) for d, c in zip(datasets, counts)]
    counts = [max(c, 1) for c in counts]
    shards, start = [], 0
    for s in range(k):
        stop = start + (n - start) // (k - s)
        batches = datasets[start]
        for d in datasets[start + 1:stop]:
            batches = batches.concatenate(d)
        sizes, rows = _read(without_autotune(batches))
        slots = np.repeat(np.arange(start, stop, dtype=np.int32), counts[start:stop])
        if len(slots) != len(sizes):
            raise ValueError(f"the cohort's datasets gave {len(sizes)} batches where their cardinality says "
                             f"{len(slots)}: a client dataset must give the same batches each time it is read")
        shards.append((slots, sizes.numpy(), tf.nest.map_structure(lambda t: t.numpy(), rows)))
        start = stop
    return shards


def empty_shards(element_spec):
    """The shards of an empty cohort: one shard with no steps. The round
    still runs: the sum of no records is zero, the server adds the noise and
    updates the clip, and the round is counted like any other."""
    import tensorflow as tf

    rows = tf.nest.map_structure(lambda t: t.numpy(), _empty_batch(element_spec))
    return [(np.zeros([0], np.int32), np.zeros([0], np.int32), rows)]


def shard_spec(element_spec):
    """The TensorSpec structure of a shard (see ``shard_cohort``) for a task's batched ``element_spec``."""
    import tensorflow as tf

    return tf.TensorSpec([None], tf.int32), tf.TensorSpec([None], tf.int32), element_spec


def _read(batches):
    """(each batch's size, every batch's rows concatenated) of a dataset, in one traced pass (traced once per
    element structure: ``tf.function`` keys its traces on the dataset's spec)."""
    return _traced_read()(batches)


@functools.cache
def _traced_read():
    import tensorflow as tf

    @tf.function
    def read(ds):
        spec = tf.nest.flatten(ds.element_spec)
        sizes = tf.TensorArray(tf.int32, size=0, dynamic_size=True)
        parts = [tf.TensorArray(t.dtype, size=0, dynamic_size=True, infer_shape=False,
                                element_shape=tf.TensorShape([None]).concatenate(t.shape[1:])) for t in spec]
        i = tf.constant(0)
        for batch in iter(ds):  # an iterator loop, not ReduceDataset
            leaves = tf.nest.flatten(batch)
            sizes = sizes.write(i, tf.shape(leaves[0])[0])
            parts = [p.write(i, leaf) for p, leaf in zip(parts, leaves)]
            i += 1
        # concat() of a TensorArray that was never written fails: an empty shard gives empty rows instead
        empty = [tf.zeros([0] + [d or 0 for d in t.shape.as_list()[1:]], t.dtype) for t in spec]
        rows = [tf.cond(i > 0, lambda p=p: p.concat(), lambda e=e: e) for p, e in zip(parts, empty)]
        return sizes.stack(), tf.nest.pack_sequence_as(ds.element_spec, rows)

    return read


def _num_batches(ds) -> int:
    import tensorflow as tf

    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))  # unknown length: count once


def _empty_batch(spec):
    import tensorflow as tf

    return tf.nest.map_structure(lambda t: tf.zeros([0] + t.shape.as_list()[1:], t.dtype), spec)


def build_process(task, cfg: TrainConfig, mech, restartable: bool = False):
    """The learning process of a client-level mechanism for ``task``: its DP
    query is ``mech.make_query(record specs)`` (TFF's ``gaussian_adaptive``
    for DP-FedAvg, ``tree_aggregation`` for DP-FTRL). ``next(state, shards)``
    takes ``shard_cohort(client datasets, n)`` for any n ≥ 1.

    ``restartable``: the process also gets ``restart_tree(state, seeds)``,
    which restarts DP-FTRL's noise tree with the given noise seeds."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg

    model_fn = dp_fedavg.model_fn_for(task, cfg.frozen_layers)
    lr = float(client_learning_rate(cfg))
    attentive = getattr(mech, "attentive", False)
    with tf.Graph().as_default():
        model = model_fn()
        metric_finalizers = model.metric_finalizers()
        input_spec = model.input_spec
        weights_type = tff.learning.models.weights_type_from_model(model)
    trainable_spec = tuple(tf.TensorSpec(t.shape, t.dtype) for t in weights_type.trainable)
    # FedAtt: each shard is one client whose raw (unclipped, non-finite zeroed) update the attentive
    # aggregation weighs; the sum query only carries the update out of the shard.
    query = _plain_sum_query() if attentive else mech.make_query(trainable_spec)
    shard_type = tff.types.tensorflow_to_type(shard_spec(input_spec))

    @tff.tensorflow.computation
    def initial_weights():
        return tff.learning.models.ModelWeights.from_model(model_fn())

    @tff.tensorflow.computation
    def initial_query_state():
        return query.initial_global_state()

    query_state_type = initial_query_state.type_signature.result

    @tff.tensorflow.computation(query_state_type)
    def derive_params(state):
        return query.derive_sample_params(state)

    params_type = derive_params.type_signature.result


    @tff.tensorflow.computation(weights_type, params_type, shard_type)
    def shard_update(initial, params, shard):
        return _make_shard_update(model_fn, task.loss, query, trainable_spec, lr)(initial, params, shard)

    record_sum_type = shard_update.type_signature.result[0]

    @tff.tensorflow.computation(record_sum_type, query_state_type)
    def noised_mean(record_sum, state):
        result, new_state, _ = query.get_noised_result(record_sum, state)
        return result, new_state, _with_norms(query.derive_metrics(new_state), state, result)

    secure = getattr(mech, "secure_aggregation", False)
    fedatt = None
    if attentive:
        from tff_pipeline import fedatt as fedatt_lib

        fedatt = fedatt_lib.build_factory(mech.attention_temperature).create(record_sum_type)
    return _assemble(cfg, weights_type, shard_type, metric_finalizers, query, restartable, initial_weights,
                     initial_query_state, derive_params, shard_update, noised_mean,
                     _secure_sums(record_sum_type, mech.secure_sum_bound) if secure else None, fedatt)


def client_learning_rate(cfg: TrainConfig) -> float:
    """The clients' SGD learning rate: --personalize_learning_rate under --meta_learning=reptile (the inner loop
    is the personalization's), else --client_learning_rate."""
    return cfg.personalize_learning_rate if cfg.meta_learning == "reptile" else cfg.client_learning_rate


def reptile_steps(ds, steps: int):
    """A client's batches for a Reptile inner loop: exactly ``steps`` batches, cycling over its own (a client
    without data keeps none: it sends a zero update, as in any round)."""
    if int(ds.cardinality()) == 0:
        return ds
    return ds.repeat().take(steps)


def _plain_sum_query():
    """tensorflow-privacy's sum query without clipping or noise (--aggregation=attentive, never with DP)."""
    import tensorflow_privacy as tfp

    return tfp.NoPrivacySumQuery()


def _secure_sums(record_type, bound: float):
    """--secure_aggregation: the aggregations of next_fn as secure sums (TFF's ``SecureSumFactory``, whose
    intrinsic is ``federated_secure_sum_bitwidth``): the clipped records quantised to 32 bits over [-bound, bound],
    the client and zeroed counts as 1-bit-per-client integers, the training metrics by TFF's
    ``secure_sum_then_finalize``. Each shard must then be one client (the training loop makes it so): a shard's
    own sum of several clients would be plaintext. Returns (records, counts) aggregation processes."""
    import numpy as np
    import tensorflow_federated as tff

    records = tff.aggregators.SecureSumFactory(float(bound)).create(record_type)
    counts = tff.aggregators.SecureSumFactory(1).create(tff.TensorType(np.int32))
    return records, counts


def _with_norms(metrics, state, result):
    """``metrics`` plus ``update_norm`` (L2 norm of the noised mean update) and ``expected_noise_norm``
    (σ·√d / denominator: the norm the round's Gaussian noise alone would have, from the query's own stddev and
    normaliser), when the query exposes them (tensorflow-privacy's NormalizedQuery over a Gaussian sum). Both are
    functions of the released update and of public settings: post-processing, no privacy cost. Their squares'
    difference estimates the squared norm of the clipped signal (README, "Private training that learns")."""
    import tensorflow as tf

    inner = getattr(state, "numerator_state", state)
    stddev = getattr(getattr(inner, "sum_state", inner), "stddev", None)
    denominator = getattr(state, "denominator", None)
    if stddev is None or denominator is None:
        return metrics
    leaves = tf.nest.flatten(result)
    d = float(sum(int(np.prod(t.shape)) for t in leaves))
    out = collections.OrderedDict(metrics)
    out["update_norm"] = tf.linalg.global_norm(leaves)
    out["expected_noise_norm"] = tf.cast(stddev, tf.float32) * d**0.5 / tf.cast(denominator, tf.float32)
    return out


def _assemble(cfg, weights_type, shard_type, metric_finalizers, query, restartable, initial_weights,
              initial_query_state, derive_params, shard_update, noised_mean, secure=None, fedatt=None):
    """The LearningProcess from TFF's broadcast distributor, the shard computations and TFF's optimizer
    finalizer; its state is TFF's LearningAlgorithmState. ``fedatt``: an attentive aggregation process
    (tff_pipeline.fedatt) that replaces the query's sum and noised mean; its state is the aggregator's."""
    import tensorflow_federated as tff

    from tff_pipeline import dp_fedavg

    if fedatt:
        @tff.tensorflow.computation
        def plain_params():  # the sum query's (empty) sample params; only FedAtt's process needs them
            return query.derive_sample_params(query.initial_global_state())

    metrics_agg = (tff.learning.metrics.secure_sum_then_finalize if secure else
                   tff.learning.metrics.sum_then_finalize)(metric_finalizers)

    def plain_sum(value):
        return tff.federated_sum(value), None

    def secure_sum(process):
        def aggregate(value):
            out = process.next(process.initialize(), value)  # fixed bounds: the state is empty
            return out.result, out.measurements
        return aggregate

    sum_records, sum_count = (secure_sum(secure[0]), secure_sum(secure[1])) if secure else (plain_sum, plain_sum)
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
    finalizer = tff.learning.templates.build_apply_optimizer_finalizer(dp_fedavg.server_optimizer(cfg), weights_type)
    state_cls = tff.learning.templates.LearningAlgorithmState

    @tff.federated_computation
    def init_fn():
        return tff.federated_zip(state_cls(
            tff.federated_eval(initial_weights, tff.SERVER), distributor.initialize(),
            tff.federated_value((), tff.SERVER),
            fedatt.initialize() if fedatt else tff.federated_eval(initial_query_state, tff.SERVER),
            finalizer.initialize()))

    @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(shard_type, tff.CLIENTS))
    def next_fn(state, shards):
        dist = distributor.next(state.distributor, state.global_model_weights)
        if fedatt:
            params = tff.federated_broadcast(tff.federated_eval(plain_params, tff.SERVER))
        else:
            params = tff.federated_broadcast(tff.federated_map(derive_params, state.aggregator))
        records, local_metrics, clients, zeroed = tff.federated_map(shard_update, (dist.result, params, shards))
        if fedatt:
            out = fedatt.next(state.aggregator, records)
            update, query_state, secure_measurements = out.result, out.state, None
            query_metrics = out.measurements
        else:
            record_sum, secure_measurements = sum_records(records)
            update, query_state, query_metrics = tff.federated_map(noised_mean, (record_sum, state.aggregator))
        fin = finalizer.next(state.finalizer, state.global_model_weights, update)
        new_state = tff.federated_zip(state_cls(fin.result, dist.state, state.client_work, query_state, fin.state))
        train = metrics_agg(local_metrics)
        aggregator = collections.OrderedDict([("fedatt" if fedatt else "dp_query_metrics", query_metrics),
                                              ("non_finite_updates_zeroed", sum_count(zeroed)[0])])
        if secure:
            aggregator["secure_sum"] = secure_measurements
        metrics = tff.federated_zip(collections.OrderedDict(
            distributor=dist.measurements,
            client_work=tff.federated_zip(collections.OrderedDict(train=train, clients=sum_count(clients)[0])),
            aggregator=tff.federated_zip(aggregator),
            finalizer=fin.measurements))
        return tff.learning.templates.LearningProcessOutput(new_state, metrics)

    state_type = next_fn.type_signature.parameter[0].member

    @tff.tensorflow.computation(state_type)
    def get_model_weights(state):
        return state.global_model_weights

    @tff.tensorflow.computation(state_type, state_type.global_model_weights)
    def set_model_weights(state, weights):
        return state_cls(weights, state.distributor, state.client_work, state.aggregator, state.finalizer)

    process = tff.learning.templates.LearningProcess(init_fn, next_fn, get_model_weights, set_model_weights)
    if restartable:
        process.restart_tree = _restart_tree(query, state_type, state_cls)
    return process


def _sgd_step(keras_model, loss_fn, metrics, trainable, batch, lr: float) -> None:
    """One local SGD step of a client on ``batch``, updating TFF's metrics as its forward_pass would, except that
    the loss metric, and a metric that equals the loss (``same_as_loss``), take this batch loss instead of
    computing it again. (An empty batch stands for a client without data: Keras gives it loss 0 and zero
    gradients, and it is kept out of the metrics.)"""
    import tensorflow as tf

    x, y = batch
    with tf.GradientTape() as tape:
        predictions = keras_model(x, training=True)
        batch_loss = loss_fn(y, predictions)
        loss = tf.add_n([batch_loss] + keras_model.losses)  # as TFF's forward_pass
    if tf.shape(predictions)[0] > 0:
        for m in metrics:
            if m.name == "loss":
                tf.keras.metrics.Mean.update_state(m, batch_loss, tf.shape(predictions)[0])
            elif getattr(m, "same_as_loss", lambda _: False)(loss_fn):  # keyboard's token loss: no second softmax
                m.update_from_loss(y, batch_loss)
            else:
                m.update_state(y, predictions)
    apply_sgd(trainable, tape.gradient(loss, trainable), lr)


def apply_sgd(trainable, grads, lr: float) -> None:
    """Plain SGD, ``v -= lr * g``, on the variables that have a gradient (embeddings: only the rows used). The
    clients' step, and the bench's central limit (tff_pipeline.bench), so both run the same update."""
    import tensorflow as tf

    for v, g in zip(trainable, grads):
        if g is None:
            continue
        if isinstance(g, tf.IndexedSlices):  # embeddings: touch only the rows used
            v.scatter_sub(tf.IndexedSlices(lr * g.values, g.indices, g.dense_shape))
        else:
            v.assign_sub(lr * g)


def _add_clipped_record(query, params, acc, zeroed, initial, trainable) -> None:
    """Adds a finished client's update (broadcast minus local weights), clipped by the DP query, to ``acc``. An
    update whose L2 norm is not finite (a NaN or Inf entry, or finite entries whose norm overflows) is replaced by
    zeros; it and one of norm zero are counted. One pass for the norm, none to copy a usable update."""
    import tensorflow as tf

    from tff_pipeline import dp_fedavg

    delta = [a - v for a, v in zip(tf.nest.flatten(initial.trainable), trainable)]
    norm, finite = dp_fedavg.norm_and_usable(delta)
    zeroed.assign_add(tf.cast(tf.logical_or(tf.logical_not(finite), tf.equal(norm, 0.0)), tf.int32))
    delta = tf.cond(finite, lambda: delta, lambda: [tf.zeros_like(d) for d in delta])
    record = query.preprocess_record(params, tuple(delta))
    summed = query.accumulate_preprocessed_record(tf.nest.map_structure(tf.identity, acc), record)
    tf.nest.map_structure(lambda v, t: v.assign(t), acc, summed)


def _make_shard_update(model_fn, loss, query, trainable_spec, lr: float):
    """The TF function that trains a shard's clients one after another from the broadcast model and
    returns the sum of their clipped records (see the module docstring)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    model = model_fn()
    keras_model, loss_fn, metrics = model._keras_model, loss(), model.get_metrics()
    weights = tff.learning.models.ModelWeights.from_model(model)
    trainable = list(weights.trainable)
    template = query.initial_sample_state(trainable_spec)
    acc = tf.nest.map_structure(lambda t: tf.Variable(tf.zeros_like(t), trainable=False), template)
    current = tf.Variable(-1, dtype=tf.int32, trainable=False)
    clients = tf.Variable(0, dtype=tf.int32, trainable=False)
    zeroed = tf.Variable(0, dtype=tf.int32, trainable=False)

    @tf.function  # automatic control dependencies: every assignment runs, in program order
    def shard_update(initial, params, shard):
        slots, sizes, rows = shard
        for v in tf.nest.flatten(acc):
            v.assign(tf.zeros_like(v))
        current.assign(-1)
        clients.assign(0)
        zeroed.assign(0)

        def start_client(slot):
            tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial)
            current.assign(slot)
            clients.assign_add(1)

        def finish_client():
            _add_clipped_record(query, params, acc, zeroed, initial, trainable)

        # tf.not_equal, not !=: inside a TFF computation's graph, != on tensors is Python identity.
        # One traced while loop over the shard's tensors, one step after another (README, "Speed").
        begins = tf.cumsum(sizes, exclusive=True)
        for i in tf.range(tf.shape(slots)[0]):
            tf.autograph.experimental.set_loop_options(parallel_iterations=1)
            if tf.not_equal(slots[i], current.read_value()):
                if tf.greater_equal(current.read_value(), 0):
                    finish_client()
                start_client(slots[i])
            begin, end = begins[i], begins[i] + sizes[i]
            _sgd_step(keras_model, loss_fn, metrics, trainable,
                      tf.nest.map_structure(lambda t: t[begin:end], rows), lr)
        if tf.greater_equal(current.read_value(), 0):
            finish_client()
        return (tf.nest.map_structure(tf.identity, acc), model.report_local_unfinalized_metrics(),
                clients.read_value(), zeroed.read_value())

    return shard_update


def _restart_tree(query, state_type, state_cls):
    """(state, seeds) -> state with a new noise tree: the tree query's initial state with the given seeds
    (NormalizedQuery around TreeResidualSumQuery, as TFF's tree_aggregation builds it)."""
    import tensorflow as tf
    import tensorflow_federated as tff

    @tff.tensorflow.computation(state_type, tff.TensorType(np.int64, [2]))
    def restart_tree(state, seeds):
        # The tree's first leaf noise is drawn when its state is made, so the seeds go in first and the tree is
        # then made from them by the query's own restart (reset_state), which draws every node from them.
        fresh = query.initial_global_state()
        tree = fresh.numerator_state.tree_state
        generator = tree.value_generator_state._replace(seeds=seeds)
        numerator = fresh.numerator_state._replace(tree_state=tree._replace(value_generator_state=generator))
        aggregator = fresh._replace(numerator_state=query._numerator.reset_state(None, numerator))
        tf.nest.assert_same_structure(aggregator, state.aggregator)
        return state_cls(state.global_model_weights, state.distributor, state.client_work, aggregator,
                         state.finalizer)

    return restart_tree
