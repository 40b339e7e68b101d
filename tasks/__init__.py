"""Task registry: name -> module with ``Settings`` (the task's own flags) and
``build(cfg) -> tff_pipeline.task.Task`` (which reads them as ``cfg.task_settings``)."""

import importlib

REGISTRY = {
    "keyboard": "tasks.keyboard",
    "medical": "tasks.medical",
    "traffic": "tasks.traffic",
}


# Private by default: the target ε a task trains to when neither --noise_multiplier nor --target_epsilon is
# given (each task's docstring says the same). No DP only with an explicit --noise_multiplier=0.
DEFAULT_TARGET_EPSILON = {
    "keyboard": 3.0,
    "medical": 10.0,
    "traffic": 10.0,
}


def check_name(name: str) -> None:
    from tff_pipeline.config import ConfigError

    if name not in REGISTRY:
        raise ConfigError(f"--task={name!r} is unknown; choose one of: {', '.join(sorted(REGISTRY))}")


def settings_class(name: str):
    """The task's own settings (a frozen dataclass of flags, defined in its module)."""
    check_name(name)
    return importlib.import_module(REGISTRY[name]).Settings


def build(cfg):
    check_name(cfg.task)
    return importlib.import_module(REGISTRY[cfg.task]).build(cfg)
