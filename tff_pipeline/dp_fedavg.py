"""DP-FedAvg with adaptive clipping, composed from TFF's own parts.

``tff.learning.algorithms.build_unweighted_fed_avg`` composes the distributor,
client work (local SGD), aggregator and finalizer (server optimizer). The
aggregator is ``tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive``:
per-client L2 clipping at an adaptive norm, one Gaussian draw on the sum, and
the private quantile update of the clip (Andrew et al. 2021,
https://arxiv.org/abs/1905.03871), normalised by the expected cohort size.
Averaging is unweighted, as user-level DP requires (McMahan et al. 2018,
https://arxiv.org/abs/1710.06963). No zeroing stage: TFF's default zeroing in
``dp_aggregator`` adapts its threshold with a non-private quantile estimate.
"""

from __future__ import annotations

from tff_pipeline.config import ConfigError, TrainConfig
from tff_pipeline.privacy import PrivacyConfig
from tff_pipeline.task import Task


def build_aggregator(cfg: TrainConfig, pcfg: PrivacyConfig):
    import tensorflow_federated as tff

    return tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
        noise_multiplier=float(pcfg.noise_multiplier),
        clients_per_round=float(pcfg.clients_per_round),
        initial_l2_norm_clip=cfg.initial_clip,
        target_unclipped_quantile=cfg.target_unclipped_quantile,
        learning_rate=cfg.clip_learning_rate,
        clipped_count_stddev=pcfg.clipped_count_stddev,
    )


def build_keras_model(task: Task, frozen: tuple[str, ...] = ()):
    """The task's Keras model with the named layers made non-trainable: TFF
    then neither trains nor aggregates them (they get no noise and release
    nothing), so DP noise is spread over fewer parameters."""
    model = task.build_model()
    set_frozen(model, frozen)
    return model


def set_frozen(model, frozen: tuple[str, ...]) -> None:
    names = [l.name for l in model.layers]
    for n in frozen:
        if n not in names:
            raise ConfigError(f"--freeze_layers: the {model.name} model has no layer {n!r}; "
                              f"its layers are {', '.join(names)}")
    for layer in model.layers:
        layer.trainable = layer.name not in frozen


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


def build_process(task: Task, cfg: TrainConfig, pcfg: PrivacyConfig):
    import tensorflow_federated as tff

    return tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn_for(task, cfg.frozen_layers),
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=cfg.client_learning_rate),
        server_optimizer_fn=server_optimizer(cfg),
        model_aggregator=build_aggregator(cfg, pcfg),
    )
