"""Attentive aggregation (FedAtt; Ji et al. 2019, "Learning Private Neural Language Modeling with Attentive
Aggregation", https://arxiv.org/abs/1812.07108) as a TFF aggregation factory.

Each client's update is delta_i = w - w_i (the server model minus the client's trained model, as TFF's
model-delta client work sends it). For every weight tensor k, the server weighs the clients by a softmax over
their layer-wise distances to the server model, s_i^k = ||w^k - w_i^k||_2 = ||delta_i^k||_2:

    alpha_i^k = exp(s_i^k / T) / sum_j exp(s_j^k / T),     update^k = sum_i alpha_i^k delta_i^k,

and the server optimizer then takes its step with that update (the paper's w <- w - eps * update is server SGD
with learning rate eps). T = 1 is the paper's rule; ``temperature`` generalises it (T -> inf is FedAvg's plain
mean). In TFF terms: the distances go to the server, their per-tensor maximum comes back (so every exp is at
most 1 and cannot overflow), and the weighted updates and the weights are summed with ``federated_sum``.

Not differentially private: a client's weight depends on its own update and every other client's, so one
client changes the weights of all the others and the clipped sum's sensitivity bound no longer holds. The
pipeline refuses it with client-level DP (tff_pipeline.mechanisms.dp_fedavg).
"""

from __future__ import annotations

import collections


def build_factory(temperature: float = 1.0):
    """A ``tff.aggregators.UnweightedAggregationFactory`` for FedAtt. Its state holds the temperature T; its
    measurements, per round and averaged over weight tensors, are the largest client share ``max_weight`` and the
    effective number of clients ``effective_clients`` = 1 / sum_i alpha_i^2 (the cohort size when every distance
    is equal). Both come from the clients' updates without noise: operator-only."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_federated as tff

    if not (temperature > 0 and np.isfinite(temperature)):
        raise ValueError(f"temperature={temperature} must be a finite number > 0")

    class AttentiveAggregationFactory(tff.aggregators.UnweightedAggregationFactory):
        def create(self, value_type):
            leaf_types = tff.structure.flatten(value_type)
            for t in leaf_types:
                if not (isinstance(t, tff.TensorType) and np.issubdtype(t.dtype, np.floating)):
                    raise TypeError(f"FedAtt aggregates float tensors; got {t}")
            n_leaves = len(leaf_types)
            vector = tff.TensorType(np.float32, [n_leaves])

            @tff.tensorflow.computation
            def initial_state():
                return collections.OrderedDict(temperature=tf.constant(temperature, tf.float32))

            state_type = initial_state.type_signature.result

            @tff.tensorflow.computation(value_type)
            def distances(delta):
                return tf.stack([tf.cast(tf.norm(tf.reshape(t, [-1])), tf.float32) for t in tf.nest.flatten(delta)])

            @tff.tensorflow.computation(value_type, vector, vector, state_type)
            def weigh(delta, dist, top, state):
                # exp((s - max) / T) in (0, 1]: the client with the largest distance of a tensor gets 1.
                w = tf.exp((dist - top) / state["temperature"])
                leaves = [t * tf.cast(w[k], t.dtype) for k, t in enumerate(tf.nest.flatten(delta))]
                return tf.nest.pack_sequence_as(delta, leaves), w, tf.square(w)

            @tff.tensorflow.computation(value_type, vector, vector)
            def normalise(weighted_sum, weight_sum, square_sum):
                leaves = [t / tf.cast(weight_sum[k], t.dtype) for k, t in enumerate(tf.nest.flatten(weighted_sum))]
                share_max = 1.0 / weight_sum  # the largest-distance client's weight, exp(0) = 1, over the sum
                effective = tf.square(weight_sum) / square_sum
                return (tf.nest.pack_sequence_as(weighted_sum, leaves),
                        collections.OrderedDict(max_weight=tf.reduce_mean(share_max),
                                                effective_clients=tf.reduce_mean(effective)))

            @tff.federated_computation
            def init_fn():
                return tff.federated_eval(initial_state, tff.SERVER)

            @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(value_type, tff.CLIENTS))
            def next_fn(state, value):
                dist = tff.federated_map(distances, value)
                top = tff.federated_broadcast(tff.federated_max(dist))
                weighted, w, w2 = tff.federated_map(
                    weigh, (value, dist, top, tff.federated_broadcast(state)))
                result, measurements = tff.federated_map(
                    normalise, (tff.federated_sum(weighted), tff.federated_sum(w), tff.federated_sum(w2)))
                return tff.templates.MeasuredProcessOutput(state=state, result=result, measurements=measurements)

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return AttentiveAggregationFactory()
