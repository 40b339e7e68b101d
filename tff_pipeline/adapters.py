"""Low-rank adapters (LoRA, Hu et al. 2021, https://arxiv.org/abs/2106.09685)
for DP fine-tuning: the pre-trained kernel W stays fixed (public) and only
W + A·B is learnt, with A (fan-in × r) and B (r × fan-out), B starting at
zero. With r = 4 on the attention and feed-forward projections of our
keyboard model, DP-FedAvg trains a few thousand coordinates instead of
about a hundred thousand, so the noise, whose norm grows with √d, is
spread over far fewer of them (issue 15).

``LoRADense`` and ``LoRAEinsumDense`` hold the original layer as a sublayer
named ``base``; ``set_trainable(model, "adapters")`` freezes every base and
every other layer and leaves only the A, B matrices trainable (TFF then
trains, clips, noises and aggregates only those). ``merge`` folds A·B into
the kernels of a plain model of the same shape (r = 0) for serving.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class LowRank(tf.keras.layers.Layer):
    """The adapter of one kernel: A (fan-in × r, random) and B (r × fan-out, zero), so that A·B starts at zero.
    Its own layer, so that it can be trained while the kernel it adapts is frozen, and the other way round."""

    def __init__(self, rank: int, kernel_shape, fan_in_dims: int, **kwargs):
        super().__init__(**kwargs)
        self.rank, self.kernel_shape, self.fan_in_dims = rank, tuple(int(d) for d in kernel_shape), fan_in_dims

    def build(self, input_shape=None):
        fan_in = int(np.prod(self.kernel_shape[: self.fan_in_dims]))
        fan_out = int(np.prod(self.kernel_shape[self.fan_in_dims :]))
        self.a = self.add_weight("lora_a", (fan_in, self.rank),
                                 initializer=tf.keras.initializers.RandomNormal(stddev=1.0 / np.sqrt(fan_in)))
        self.b = self.add_weight("lora_b", (self.rank, fan_out), initializer="zeros")
        super().build(input_shape)

    def delta(self):
        """A·B in the kernel's shape."""
        if not self.built:
            self.build()
        return tf.reshape(tf.matmul(self.a, self.b), self.kernel_shape)

    def get_config(self):
        return {**super().get_config(), "rank": self.rank, "kernel_shape": list(self.kernel_shape),
                "fan_in_dims": self.fan_in_dims}


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class BiasAdapter(tf.keras.layers.Layer):
    """A zero-initialised vector added to its input (the logits): the output layer's bias as an adapter, so that
    the next-word prior can move to the clients' vocabulary while the output kernel stays frozen."""

    def build(self, input_shape):
        self.shift = self.add_weight("bias_shift", (int(input_shape[-1]),), initializer="zeros")
        super().build(input_shape)

    def call(self, x):
        return x + self.shift


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class LoRADense(tf.keras.layers.Layer):
    """``Dense`` with a rank-``rank`` update: activation(x (W + A B) + b)."""

    def __init__(self, units: int, rank: int, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.units, self.rank, self.activation = units, rank, tf.keras.activations.get(activation)
        self.base = tf.keras.layers.Dense(units, name="base")

    def build(self, input_shape):
        self.base.build(input_shape)
        self.adapter = LowRank(self.rank, self.base.kernel.shape, 1, name="adapter")
        self.adapter.build()
        super().build(input_shape)

    def call(self, x):
        return self.activation(tf.matmul(x, self.base.kernel + self.adapter.delta()) + self.base.bias)

    def get_config(self):
        return {**super().get_config(), "units": self.units, "rank": self.rank,
                "activation": tf.keras.activations.serialize(self.activation)}


class LoRAEinsumDense(tf.keras.layers.Layer):
    """``EinsumDense`` (the projections inside MultiHeadAttention) with a rank-``rank`` kernel update; the
    kernel's leading axes that the input carries are its fan-in."""

    def __init__(self, base: tf.keras.layers.EinsumDense, rank: int, **kwargs):
        super().__init__(name=base.name, **kwargs)
        self.base, self.rank = base, rank

    def build(self, input_shape):
        self.base.build(input_shape)
        eq_in, eq_kernel = self.base.equation.split("->")[0].split(",")
        fan_in_dims = 0
        while fan_in_dims < len(eq_kernel) and eq_kernel[fan_in_dims] in eq_in:
            fan_in_dims += 1
        self.adapter = LowRank(self.rank, self.base.kernel.shape, fan_in_dims, name="adapter")
        self.adapter.build()
        super().build(input_shape)

    def call(self, x):
        y = tf.einsum(self.base.equation, x, self.base.kernel + self.adapter.delta())
        return y + self.base.bias if self.base.bias is not None else y


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class LoRAMultiHeadAttention(tf.keras.layers.MultiHeadAttention):
    """MultiHeadAttention whose query, key, value and output projections carry rank-``rank`` updates."""

    def __init__(self, rank: int, **kwargs):
        super().__init__(**kwargs)
        self.rank = rank

    def _build_from_signature(self, query, value, key=None):
        super()._build_from_signature(query, value, key)
        with tf.init_scope():
            self._query_dense = LoRAEinsumDense(self._query_dense, self.rank)
            self._key_dense = LoRAEinsumDense(self._key_dense, self.rank)
            self._value_dense = LoRAEinsumDense(self._value_dense, self.rank)
            self._output_dense = LoRAEinsumDense(self._output_dense, self.rank)

    def get_config(self):
        return {**super().get_config(), "rank": self.rank}


def _layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
    return [m for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]


ADAPTERS = (LowRank, BiasAdapter)


def has_adapters(model: tf.keras.Model) -> bool:
    return any(isinstance(layer, ADAPTERS) for layer in _layers(model))


def set_trainable(model: tf.keras.Model, part: str) -> None:
    """Which weights train: ``part`` = "all", "base" (all but the adapters: public pre-training) or "adapters"
    (only the A, B matrices: DP fine-tuning). Containers stay trainable; each leaf layer is set."""
    if part not in ("all", "base", "adapters"):
        raise ValueError(f"part={part!r}: all, base or adapters")
    model.trainable = True
    for layer in _layers(model):
        if any(True for _ in layer._flatten_layers(include_self=False, recursive=False)):
            continue  # a container: its leaves decide
        layer.trainable = (part != "base") if isinstance(layer, ADAPTERS) else (part != "adapters")


def adapted_layers(model: tf.keras.Model):
    return [layer for layer in _layers(model) if isinstance(layer, (LoRADense, LoRAEinsumDense))]


def merge_into(adapted: tf.keras.Model, plain: tf.keras.Model) -> tf.keras.Model:
    """Copies ``adapted``'s weights into ``plain`` (the same architecture without adapters), each adapted kernel
    as W + A·B: the model to serve. Both are walked with every weight trainable, so the orders match; ``adapted``
    gets its trainable flags back after (they set the order in which Keras saves its weights)."""
    flags = [(layer, layer.trainable) for layer in _layers(adapted)] + [(adapted, adapted.trainable)]
    set_trainable(adapted, "all")
    plain.trainable = True
    merged = {id(layer.base.kernel): layer.base.kernel + layer.adapter.delta() for layer in adapted_layers(adapted)}
    for layer in _layers(adapted):  # a bias adapter after a Dense layer: folded into that layer's bias
        if isinstance(layer, BiasAdapter):
            dense = adapted.get_layer(layer.name.removesuffix("_adapter"))
            merged[id(dense.bias)] = dense.bias + layer.shift
    adapter_vars = {id(v) for layer in _layers(adapted) if isinstance(layer, ADAPTERS) for v in layer.weights}
    values = [np.asarray(merged[id(v)]) if id(v) in merged else v.numpy() for v in adapted.weights
              if id(v) not in adapter_vars]
    plain.set_weights(values)
    for layer, trainable in flags:  # each layer's own flag, as it was (the public setter would propagate)
        layer._trainable = trainable
    return plain
