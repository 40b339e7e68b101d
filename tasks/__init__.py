"""Task registry: name -> module with ``build(cfg) -> tff_pipeline.task.Task``."""

import importlib

REGISTRY = {
    "keyboard": "tasks.keyboard",
}


def build(cfg):
    from tff_pipeline.config import ConfigError

    if cfg.task not in REGISTRY:
        raise ConfigError(f"--task={cfg.task!r} is unknown; choose one of: {', '.join(sorted(REGISTRY))}")
    return importlib.import_module(REGISTRY[cfg.task]).build(cfg)
