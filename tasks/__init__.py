"""Task registry: name -> module with ``build(cfg) -> tff_pipeline.task.Task``."""

import importlib

REGISTRY = {
    "keyboard": "tasks.keyboard",
    "medical": "tasks.medical",
    "traffic": "tasks.traffic",
}


def check_name(name: str) -> None:
    from tff_pipeline.config import ConfigError

    if name not in REGISTRY:
        raise ConfigError(f"--task={name!r} is unknown; choose one of: {', '.join(sorted(REGISTRY))}")


def build(cfg):
    check_name(cfg.task)
    return importlib.import_module(REGISTRY[cfg.task]).build(cfg)
