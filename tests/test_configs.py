"""Every shipped config that states an ε must not exceed it: recomputed here
from the config's own settings and the task's real population, through the
same code a run uses."""

import glob
import os
import re

import pytest

from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.cfg")))


def read_config(path):
    from tff_pipeline import cli
    from tff_pipeline.config import TrainConfig

    types = cli.field_types(TrainConfig)
    kw = {}
    text = open(path, encoding="utf-8").read()
    for line in text.splitlines():
        if line.startswith("--"):
            k, _, v = line[2:].partition("=")
            kw[k] = {bool: lambda s: s.lower() in ("true", "1"), int: int, float: float, str: str}[types[k]](v)
    stated = re.search(r"^# states: ε ≤ ([\d.]+) at δ = ([\d.e-]+)", text, re.M)
    return TrainConfig(**kw), stated


def test_every_config_states_its_epsilon():
    assert len(CONFIGS) == 3
    for path in CONFIGS:
        assert read_config(path)[1], f"{path} does not state its ε ('# states: ε ≤ X at δ = Y')"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_epsilon_does_not_exceed_what_it_states(path):
    import tasks
    from tff_pipeline import mechanisms, privacy

    cfg, stated = read_config(path)
    assert cfg.delta == float(stated.group(2))
    task = tasks.build(cfg)
    pcfg = mechanisms.resolve(cfg, task).mechanism
    eps = privacy.epsilon(pcfg, cfg.rounds)[0]
    print(f"{os.path.basename(path)}: population {task.population}, z = {pcfg.noise_multiplier}, "
          f"ε = {eps:.5f} ≤ {stated.group(1)}")
    assert pcfg.is_private and eps <= float(stated.group(1))
