"""DP-FedAvg with adaptive clipping: the parts shared by our processes.

The DP mechanism is TFF's
``tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive``:
per-client L2 clipping at an adaptive norm, one Gaussian draw on the sum, and
the private quantile update of the clip (Andrew et al. 2021,
https://arxiv.org/abs/1905.03871), normalised by the expected cohort size.
Averaging is unweighted, as user-level DP requires (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963). No zeroing stage: TFF's default zeroing in
``dp_aggregator`` adapts its threshold with a non-private quantile estimate.

The pipeline trains with ``tff_pipeline.cohort``, which uses this factory's
query. ``build_per_client_process`` is the same algorithm as TFF's per-client
``build_unweighted_fed_avg``: the benchmark's "before", and the reference.
"""

from __future__ import annotations

import collections

from tff_pipeline.config import ConfigError, TrainConfig
from tff_pipeline.task import Task


def build_aggregator(mech):
    """TFF's ``gaussian_adaptive`` factory with the settings of a DPFedAvgAdaptive mechanism."""
    import tensorflow_federated as tff

    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=float(mech.noise_multiplier),
        clients_per_round=float(mech.clients_per_round),
        initial_l2_norm_clip=mech.initial_clip,
        target_unclipped_quantile=mech.target_unclipped_quantile,
        learning_rate=mech.clip_learning_rate,
        clipped_count_stddev=mech.clipped_count_stddev,
    )


def build_keras_model(task: Task, frozen: tuple[str, ...] = ()):
    """The task's Keras model with the named layers made non-trainable: TFF
    then neither trains nor aggregates them (they get no noise and release
    nothing), so DP noise is spread over fewer parameters."""
    model = task.build_model()
    set_frozen(model, frozen)
    return model


def set_frozen(model, frozen: tuple[str, ...], phase: str = "federated") -> None:
    """What trains in ``phase``: "federated" (the DP rounds) or "public" (pre-training on public data, central
    baselines). A model with low-rank adapters (tff_pipeline.adapters) trains its base weights in public
    pre-training and only its adapters in the federated rounds; otherwise every layer trains except, in the
    federated rounds, those named in --freeze_layers."""
    from tff_pipeline import adapters

    names = [l.name for l in model.layers]
    for n in frozen:
        if n not in names:
            raise ConfigError(f"--freeze_layers: the {model.name} model has no layer {n!r}; "
                              f"its layers are {', '.join(names)}")
    if adapters.has_adapters(model):
        adapters.set_trainable(model, "base" if phase == "public" else "adapters")
        return
    for layer in model.layers:
        layer.trainable = phase == "public" or layer.name not in frozen


def model_fn_for(task: Task, frozen: tuple[str, ...] = ()):
    """A TFF model function wrapping the task's Keras model."""
    import tensorflow_federated as tff

    spec = task.element_spec

    def model_fn():
        return tff.learning.models.from_keras_model(
            build_keras_model(task, frozen), loss=task.loss(), input_spec=spec, metrics=task.metrics()
        )

    return model_fn


def server_optimizer(cfg: TrainConfig):
    """The server optimizer of --server_optimizer (shared by both DP units)."""
    import tensorflow_federated as tff

    opt = tff.learning.optimizers
    if cfg.server_optimizer == "adam":
        return opt.build_adam(learning_rate=cfg.server_learning_rate, epsilon=1e-3)
    return opt.build_sgdm(learning_rate=cfg.server_learning_rate, momentum=cfg.server_momentum)


def build_per_client_process(task: Task, cfg: TrainConfig, mech, guard: bool = True):
    """DP-FedAvg as TFF's per-client ``build_unweighted_fed_avg`` (one TF
    computation per client). The pipeline runs ``tff_pipeline.cohort``
    instead, the same algorithm at about half the cost per round. This one is
    kept as the benchmark's "before" (with our non-finite guard) and, with
    ``guard=False``, as TFF's stock process: the benchmark's and the tests'
    reference."""
    import tensorflow_federated as tff

    aggregator = build_aggregator(mech)
    return tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn_for(task, cfg.frozen_layers),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_learning_rate),
        server_optimizer_fn=server_optimizer(cfg),
        model_aggregator=zero_non_finite(aggregator) if guard else aggregator,
    )


def is_usable_update(leaves):
    """True when every entry of the update and its L2 norm are finite. A
    finite update can still have a norm that overflows float32 (e.g. [3e19,
    3e19]); clipping it would give NaN, so it counts as unusable and is
    zeroed, a function of that client alone (the sensitivity is unchanged)."""
    return norm_and_usable(leaves)[1]


def norm_and_usable(leaves):
    """(L2 norm of the update, ``is_usable_update``) in one pass: a NaN or Inf entry makes the norm NaN or Inf,
    so the norm's finiteness is both conditions."""
    import tensorflow as tf

    norm = tf.linalg.global_norm(leaves)
    return norm, tf.math.is_finite(norm)


def zero_non_finite(inner, secure: bool = False):
    """Wraps an unweighted aggregation factory so that a client update with
    any NaN or Inf, or whose L2 norm overflows, is replaced by zeros on the client, before clipping and
    noise. A bad client then contributes nothing instead of poisoning the
    global model. (TFF's model-delta client work already zeroes a
    non-finite delta; this guard holds for any client work.)

    Privacy: the replacement is a function of that one client's own update,
    and a zero update has norm 0 (below any clip), so the sensitivity of the
    clipped sum, and hence the DP guarantee, is unchanged.

    Measurement ``non_finite_updates_zeroed``: client updates that arrive
    non-finite or exactly zero (what TFF's zeroing leaves; a client that
    trained on nothing also counts). It is summed without noise: like the
    training metrics it is for the operator, not for release (the report
    says so). ``secure``: summed with the secure-sum intrinsic (one bit per
    client), for aggregations that must have no plaintext path."""
    import tensorflow as tf
    import tensorflow_federated as tff

    class ZeroNonFiniteFactory(tff.aggregators.UnweightedAggregationFactory):
        def create(self, value_type):
            inner_process = inner.create(value_type)

            @tff.tensorflow.computation(value_type)
            def zero_if_non_finite(value):
                leaves = tf.nest.flatten(value)
                finite = is_usable_update(leaves)
                all_zero = tf.reduce_all([tf.reduce_all(tf.equal(x, 0)) for x in leaves])
                zeroed = tf.nest.map_structure(lambda x: tf.where(finite, x, tf.zeros_like(x)), value)
                return zeroed, tf.cast(tf.logical_or(tf.logical_not(finite), all_zero), tf.int32)

            @tff.federated_computation
            def init_fn():
                return inner_process.initialize()

            @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
            def next_fn(state, value):
                zeroed, bad = tff.federated_map(zero_if_non_finite, value)
                out = inner_process.next(state, zeroed)
                measurements = tff.federated_zip(collections.OrderedDict(
                    dp=out.measurements, non_finite_updates_zeroed=(
                        tff.federated_secure_sum_bitwidth(bad, 1) if secure else tff.federated_sum(bad))))
                return tff.templates.MeasuredProcessOutput(state=out.state, result=out.result,
                                                           measurements=measurements)

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return ZeroNonFiniteFactory()
