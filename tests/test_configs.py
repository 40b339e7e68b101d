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
    from tff_pipeline import config

    text = open(path, encoding="utf-8").read()
    stated = re.search(r"^# states: ε ≤ ([\d.]+) at δ = ([\d.e-]+)", text, re.M)
    return config.make(**config.read_flagfile(path)), stated


def test_every_config_states_its_epsilon():
    assert len(CONFIGS) == 6
    for path in CONFIGS:
        assert read_config(path)[1], f"{path} does not state its ε ('# states: ε ≤ X at δ = Y')"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_epsilon_does_not_exceed_what_it_states(path):
    import tasks
    from tff_pipeline import mechanisms, privacy

    cfg, stated = read_config(path)
    assert cfg.privacy.delta == float(stated.group(2))
    task = tasks.build(cfg)
    pcfg = mechanisms.resolve(cfg, task).mechanism
    eps = privacy.epsilon(pcfg, cfg.rounds)[0]
    print(f"{os.path.basename(path)}: population {task.population}, z = {pcfg.noise_multiplier}, "
          f"ε = {eps:.5f} ≤ {stated.group(1)}")
    assert pcfg.is_private and eps <= float(stated.group(1))


def test_settings_are_split_run_privacy_task_and_every_flag_has_help():
    import tasks
    from tff_pipeline import config

    table = config.flag_table()
    assert all(f.metadata["help"] for f, _, _ in table.values())
    parts = {name: part for name, (_, _, part) in table.items()}
    assert {n for n, p in parts.items() if p == "privacy"} == set(config.PRIVACY_NAMES)
    assert {"noise_multiplier", "initial_clip", "ftrl_clip"} <= config.PRIVACY_NAMES
    # Each task owns its settings; the run's settings hold none of them.
    assert {n for n, p in parts.items() if p == "task"} == {
        f.name for t in tasks.REGISTRY for f in __import__("dataclasses").fields(tasks.settings_class(t))}
    cfg = config.make(task="traffic", history=24, noise_multiplier=1.0, rounds=3)
    assert cfg.task_settings.history == 24 and cfg.privacy.noise_multiplier == 1.0 and cfg.rounds == 3
    assert not hasattr(cfg, "history") and not hasattr(cfg, "noise_multiplier")
    assert config.make(**cfg.to_json()) == cfg and "vocab_size" not in cfg.to_json()


def test_a_setting_of_another_task_is_refused_by_name():
    from tff_pipeline import config

    with pytest.raises(config.ConfigError, match=r"^--history=3 is a setting of the traffic task, not of "
                                                 r"--task=keyboard; drop it or use --task=traffic$"):
        config.make(task="keyboard", history=3)
    with pytest.raises(config.ConfigError, match=r"--model_dim=30 must be divisible by --heads=4"):
        config.make(task="medical", model_dim=30)
    # An older config.json held every task's settings: read without strict, the others are dropped.
    assert config.make(strict=False, task="keyboard", history=3).task_settings.seq_len == 20


def test_what_may_change_on_resume_is_said_by_the_settings_themselves():
    from tff_pipeline import config

    assert [config.kind_of(n) for n in ("rounds", "max_epsilon", "workers")] == ["resumable"] * 3
    assert [config.kind_of(n) for n in ("noise_multiplier", "delta", "seed", "batch_size", "traffic_data")] == [
        "privacy"] * 5
    assert [config.kind_of(n) for n in ("client_learning_rate", "model_dim", "history")] == ["state"] * 3
