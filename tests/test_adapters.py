"""Low-rank adapters (tff_pipeline.adapters): which weights train in each
phase, that the merged plain model computes what the adapted one does, and
that the served SavedModel equals the Keras model in a fresh process."""

import json
import os
import subprocess

import numpy as np
import pytest

from conftest import PY, ROOT

SHAPE = dict(dim=32, heads=2, layers=1, ff_dim=64)


def _models(rank=4):
    from tff_pipeline import models

    return models.causal_transformer_lm(300, 12, lora_rank=rank, **SHAPE)


def _perturb(model):
    """As if fine-tuned: every A·B and the bias shift no longer zero."""
    from tff_pipeline import adapters

    for i, layer in enumerate(adapters.adapted_layers(model)):
        layer.adapter.b.assign(np.random.default_rng(i).normal(size=layer.adapter.b.shape) * 0.2)
    shift = model.get_layer("logits_adapter").shift
    shift.assign(np.random.default_rng(99).normal(size=shift.shape))


def test_only_the_adapters_train_in_the_federated_rounds():
    from tff_pipeline import adapters, dp_fedavg

    m = _models(rank=4)
    total = sum(int(np.prod(v.shape)) for v in m.weights)
    dp_fedavg.set_frozen(m, (), phase="federated")
    trained = {v.name.split(":")[0]: int(np.prod(v.shape)) for v in m.trainable_variables}
    # rank 4: q, k, v, o of 32x32 (fan-in + fan-out = 64 each) and ff 32->64, 64->32 (96 each); the logits'
    # bias adapter (300 words)
    assert sum(trained.values()) == 4 * (4 * 64 + 2 * 96) + 300 == 2092
    assert all(n.endswith(("lora_a", "lora_b", "bias_shift")) for n in trained)
    dp_fedavg.set_frozen(m, (), phase="public")  # pre-training: everything but the adapters
    assert sum(int(np.prod(v.shape)) for v in m.trainable_variables) == total - 2092
    assert not any(v.name.split(":")[0].endswith(("lora_a", "lora_b", "bias_shift")) for v in m.trainable_variables)
    assert adapters.has_adapters(m) and not adapters.has_adapters(_models(rank=0))


def test_merged_model_computes_what_the_adapted_model_does():
    from tff_pipeline import adapters

    m = _models()
    x = np.random.default_rng(0).integers(0, 300, (4, 12)).astype(np.int32)
    before = m(x).numpy()
    _perturb(m)
    after = m(x).numpy()
    assert np.abs(after - before).max() > 1e-3  # the adapters change the output
    plain = _models(rank=0)
    plain(x)
    adapters.merge_into(m, plain)
    np.testing.assert_allclose(plain(x).numpy(), after, atol=2e-5)
    assert len(plain.weights) == len(m.weights) - 2 * len(adapters.adapted_layers(m)) - 1  # A, B; bias shift


def test_saved_model_serves_the_merged_weights(tmp_path, keyboard_task_settings):
    """The keyboard task's export of an adapted model: a fresh process loads the SavedModel and gets the
    adapted Keras model's next-word probabilities."""
    import tensorflow as tf

    import tasks
    from tff_pipeline import adapters, config

    cfg = config.make(**keyboard_task_settings, lora_rank=2)
    task = tasks.build(cfg)
    from tff_pipeline import dp_fedavg

    model = dp_fedavg.build_keras_model(task, ())  # as a run holds it: only the adapters trainable
    _perturb(model)
    x = np.random.default_rng(0).integers(4, 2000, (3, 20)).astype(np.int32)  # no padding: the last word counts
    want = tf.nn.softmax(model(x)[:, -1, :]).numpy()
    path = str(tmp_path / "sm")
    trained = [v.name for v in model.trainable_variables]
    task.export(model, path)
    # Exporting leaves the model as it was: only the adapters trainable (that order is how its weights are saved)
    assert [v.name for v in model.trainable_variables] == trained and len(trained) == 13
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, tensorflow as tf, json, sys; m = tf.saved_model.load(sys.argv[1]); "
            "x = np.load(sys.argv[2]); out = m.signatures['serving_default'](token_ids=tf.constant(x)); "
            "print(json.dumps(out['next_word_probabilities'].numpy().tolist()))")
    p = subprocess.run([PY, "-c", code, path, str(tmp_path / "x.npy")], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = np.array(json.loads(p.stdout.strip().splitlines()[-1]))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_adapters_need_public_pretraining_and_no_frozen_layers(tmp_path):
    from conftest import SMALL, call_train

    p = call_train(f"--output_dir={tmp_path / 'o'}", "--lora_rank=4", "--rounds=1", *SMALL)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "error: --lora_rank=4: adapters fine-tune a pre-trained model, and only they train in the federated rounds; "
        "give --public_pretrain_epochs > 0 and no --freeze_layers")
    assert not os.path.exists(tmp_path / "o" / "ledger.jsonl")


@pytest.fixture(scope="session")
def keyboard_task_settings():
    return dict(vocab_size=2000, model_dim=32, heads=2, ff_dim=64, max_client_examples=16, batch_size=8)
