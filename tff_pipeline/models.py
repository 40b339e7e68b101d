"""Keras attention models and the masked losses/metrics they train with."""

from __future__ import annotations

import tensorflow as tf


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class PositionEmbedding(tf.keras.layers.Layer):
    """Adds a learned embedding of each position (up to ``max_len``)."""

    def __init__(self, max_len: int, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.max_len, self.dim = max_len, dim
        self.table = tf.keras.layers.Embedding(max_len, dim)

    def call(self, x):
        positions = tf.range(tf.shape(x)[1])
        return x + self.table(positions)[tf.newaxis]

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len, "dim": self.dim}


def transformer_block(x, dim: int, heads: int, ff_dim: int, dropout: float, causal: bool, name: str,
                      lora_rank: int = 0):
    """Pre-norm self-attention block: LN, MHA, residual, LN, FFN, residual. With ``lora_rank`` > 0 the attention
    and feed-forward projections carry low-rank adapters (tff_pipeline.adapters)."""
    from tff_pipeline import adapters

    h = tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln1")(x)
    mha = dict(num_heads=heads, key_dim=dim // heads, dropout=dropout, name=f"{name}_mha")
    attention = (adapters.LoRAMultiHeadAttention(lora_rank, **mha) if lora_rank
                 else tf.keras.layers.MultiHeadAttention(**mha))
    h = attention(h, h, use_causal_mask=causal)
    x = tf.keras.layers.Add(name=f"{name}_res1")([x, h])
    h = tf.keras.layers.LayerNormalization(epsilon=1e-6, name=f"{name}_ln2")(x)
    if lora_rank:
        h = adapters.LoRADense(ff_dim, lora_rank, activation="gelu", name=f"{name}_ff1")(h)
        h = adapters.LoRADense(dim, lora_rank, name=f"{name}_ff2")(h)
    else:
        h = tf.keras.layers.Dense(ff_dim, activation="gelu", name=f"{name}_ff1")(h)
        h = tf.keras.layers.Dense(dim, name=f"{name}_ff2")(h)
    if dropout:
        h = tf.keras.layers.Dropout(dropout)(h)
    return tf.keras.layers.Add(name=f"{name}_res2")([x, h])


def causal_transformer_lm(
    vocab_size: int, max_len: int, dim: int = 96, heads: int = 4, layers: int = 1, ff_dim: int = 192,
    dropout: float = 0.0, lora_rank: int = 0,
) -> tf.keras.Model:
    """Next-token language model: token + position embedding, causal attention
    blocks, and logits over the vocabulary at every position. ``lora_rank``:
    low-rank adapters on the blocks' projections (tff_pipeline.adapters)."""
    tokens = tf.keras.Input(shape=(max_len,), dtype=tf.int32, name="token_ids")
    x = tf.keras.layers.Embedding(vocab_size, dim, name="token_embedding")(tokens)
    x = PositionEmbedding(max_len, dim, name="position_embedding")(x)
    for i in range(layers):
        x = transformer_block(x, dim, heads, ff_dim, dropout, causal=True, name=f"block{i}", lora_rank=lora_rank)
    x = tf.keras.layers.LayerNormalization(epsilon=1e-6, name="final_ln")(x)
    logits = tf.keras.layers.Dense(vocab_size, name="logits")(x)
    if lora_rank:  # the output bias adapts too: the clients' next-word prior
        from tff_pipeline import adapters

        logits = adapters.BiasAdapter(name="logits_adapter")(logits)
    return tf.keras.Model(tokens, logits, name="causal_transformer_lm")


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class MaskedSparseCrossEntropy(tf.keras.losses.Loss):
    """Mean token cross-entropy over targets that are not padding (id 0)."""

    def __init__(self, pad_id: int = 0, name: str = "masked_sparse_ce", **kwargs):
        super().__init__(name=name, reduction=tf.keras.losses.Reduction.NONE, **kwargs)
        self.pad_id = pad_id

    def call(self, y_true, y_pred):
        y_true = tf.cast(y_true, tf.int32)
        ce = tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = tf.cast(tf.not_equal(y_true, self.pad_id), ce.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(ce * mask), tf.reduce_sum(mask))

    def get_config(self):
        return {**super().get_config(), "pad_id": self.pad_id}


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class MaskedTopKAccuracy(tf.keras.metrics.Mean):
    """Top-k next-word accuracy as a keyboard's suggestion strip sees it.

    Targets in ``exclude_ids`` (padding, out-of-vocabulary, end of sentence)
    are not counted, and the k suggestions are the k most likely ids at or
    above ``first_word_id``: a keyboard never suggests <pad>/<oov>/<bos>/<eos>.
    """

    def __init__(self, k: int = 1, exclude_ids=(0,), first_word_id: int = 0, name=None, dtype=None):
        super().__init__(name=name or f"top{k}_accuracy", dtype=dtype)
        self.k = k
        self.exclude_ids = tuple(int(i) for i in exclude_ids)
        self.first_word_id = int(first_word_id)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        y_pred = tf.reshape(y_pred, [-1, tf.shape(y_pred)[-1]])
        keep = tf.ones_like(y_true, dtype=tf.bool)
        for i in self.exclude_ids:
            keep = tf.logical_and(keep, tf.not_equal(y_true, i))
        if self.first_word_id:
            y_pred = y_pred[:, self.first_word_id :]
            y_true_words = tf.maximum(y_true - self.first_word_id, 0)
        else:
            y_true_words = y_true
        hit = tf.cast(tf.math.in_top_k(y_true_words, y_pred, self.k), self.dtype)
        return super().update_state(hit, sample_weight=tf.cast(keep, self.dtype))

    def get_config(self):
        return {"k": self.k, "exclude_ids": list(self.exclude_ids), "first_word_id": self.first_word_id,
                "name": self.name, "dtype": self.dtype}


@tf.keras.utils.register_keras_serializable("tff_pipeline")
class MaskedTokenLoss(tf.keras.metrics.Mean):
    """Token-weighted mean cross-entropy over non-padding targets (for
    perplexity = exp of it), summable across clients."""

    def __init__(self, pad_id: int = 0, name="token_loss", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.pad_id = pad_id

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true = tf.cast(y_true, tf.int32)
        ce = tf.keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        mask = tf.cast(tf.not_equal(y_true, self.pad_id), self.dtype)
        return super().update_state(ce, sample_weight=mask)

    def same_as_loss(self, loss_fn) -> bool:
        """Whether a batch's value of this metric is ``loss_fn``'s (the mean over non-padding targets), so that a
        training step can add the loss it already has, weighted by the batch's targets, instead of a second
        softmax over the vocabulary (on the keyboard model that second softmax took 40% of a client's step in
        the cohort loop: README, "Speed")."""
        return isinstance(loss_fn, MaskedSparseCrossEntropy) and loss_fn.pad_id == self.pad_id

    def update_from_loss(self, y_true, batch_loss):
        """``update_state`` from the batch's loss (when ``same_as_loss``): the same sums up to rounding."""
        mask = tf.cast(tf.not_equal(tf.cast(y_true, tf.int32), self.pad_id), self.dtype)
        return super().update_state(tf.cast(batch_loss, self.dtype), sample_weight=tf.reduce_sum(mask))

    def get_config(self):
        return {"pad_id": self.pad_id, "name": self.name, "dtype": self.dtype}


def inference_fn(model: tf.keras.Model):
    """``model(x, training=False)`` as one traced tf.function over any batch
    size. Called eagerly, Keras 2.14 kept each attention call's buffers alive
    (RSS grew ~230 MB per 512-window batch until the OOM killer stopped a run)."""
    cached = getattr(model, "_tff_pipeline_inference", None)
    if cached is not None:
        return cached
    spec = [tf.TensorSpec([None, *t.shape[1:]], t.dtype) for t in model.inputs]

    @tf.autograph.experimental.do_not_convert
    def call(x):
        return model(x, training=False)

    fn = tf.function(call, input_signature=spec)
    model._tff_pipeline_inference = fn
    return fn
