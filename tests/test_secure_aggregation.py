"""--secure_aggregation: client-level DP-FedAvg whose clipped updates reach the server only as a secure sum.

Each client's clipped record is quantised and summed with TFF's secure-sum intrinsic; the server adds the noise
to that sum. TFF's C++ runtime has no implementation of the secure intrinsics, so the pipeline runs them as TFF's
test backend does: the same quantisation, clipping and modular arithmetic, without the cryptography."""

import numpy as np
import pytest

from conftest import SMALL, call_train, load_json


def _process(task, secure, **kw):
    from tff_pipeline import cohort, mechanisms, runtime
    from tff_pipeline.config import make

    runtime.install_context()
    cfg = make(vocab_size=2000, model_dim=32, heads=2, ff_dim=64, max_client_examples=16, batch_size=8,
               secure_aggregation=secure, **kw)
    mech = mechanisms.resolve(cfg, task).mechanism
    return cfg, mech, cohort.build_process(task, cfg, mech)


def test_the_secure_process_has_no_plaintext_aggregation_and_the_plaintext_one_has(keyboard_task):
    import tensorflow_federated as tff

    _, _, secure = _process(keyboard_task, True, noise_multiplier=1.0, clients_per_round=100)
    tff.test.assert_contains_secure_aggregation(secure.next)
    tff.test.assert_not_contains_unsecure_aggregation(secure.next)
    _, _, plain = _process(keyboard_task, False, noise_multiplier=1.0, clients_per_round=100)
    with pytest.raises(AssertionError):
        tff.test.assert_not_contains_unsecure_aggregation(plain.next)


def test_a_secure_round_computes_what_the_plaintext_round_does(keyboard_task):
    """No noise, the same cohort: one client per shard summed securely (32-bit quantisation) against the cohort
    summed in plaintext; the models agree to the quantisation's precision, and so do the clip updates."""
    from tff_pipeline import cohort

    ids = list(range(6))
    results, start = {}, None
    for secure in (False, True):
        # The same seed gives the same batches on a dataset's first read (a later read of the same object reshuffles).
        data = [keyboard_task.client_dataset(i, 0) for i in ids]
        _, _, process = _process(keyboard_task, secure, noise_multiplier=0.0, clients_per_round=6,
                                 initial_clip=0.05)
        state = process.initialize()
        start = start or process.get_model_weights(state)  # both start from the same weights
        state = process.set_model_weights(state, start)
        shards = cohort.shard_cohort(data, len(data) if secure else 1)
        for _ in range(2):
            out = process.next(state, shards)
            state = out.state
        results[secure] = ([np.asarray(w) for w in process.get_model_weights(state).trainable],
                           float(out.metrics["aggregator"]["dp_query_metrics"]["clip"]))
    (plain_w, plain_clip), (secure_w, secure_clip) = results[False], results[True]
    assert any(np.abs(a - np.asarray(s)).max() > 1e-4 for a, s in zip(plain_w, start.trainable))  # it moved
    for a, b in zip(plain_w, secure_w):
        np.testing.assert_allclose(b, a, atol=2e-6)
    assert secure_clip == pytest.approx(plain_clip, rel=1e-5)


@pytest.mark.parametrize("task_flags", [
    ["--task=keyboard", "--public_pretrain_epochs=1", "--freeze_layers=token_embedding,logits", *SMALL],
    ["--task=medical", "--privacy_unit=client", "--medical_model=logistic", "--clients_per_round=4",
     "--noise_multiplier=0.5", "--clipped_count_stddev=1"],
], ids=["keyboard", "medical"])
def test_a_run_with_secure_aggregation_states_its_trust_model(tmp_path, task_flags):
    out = str(tmp_path / "run")
    p = call_train(*task_flags, f"--output_dir={out}", "--rounds=2", "--eval_every=2", "--secure_aggregation")
    assert p.returncode == 0, p.stderr[-3000:]
    report = load_json(f"{out}/privacy_report.json")
    assert report["secure_aggregation"]["enabled"] is True
    md = open(f"{out}/privacy_report.md").read()
    assert "secure aggregation" in md.lower() and "production backend" in md
    header = open(f"{out}/operator/metrics.csv").readline().strip().split(",")
    assert {"train_loss", "train_secure_upper_clipped_count", "train_update_norm"} <= set(header), header


@pytest.mark.parametrize("flags, words", [
    (["--task=medical", "--privacy_unit=example"], "--secure_aggregation needs client-level DP-FedAvg"),
    (["--task=keyboard", "--workers=127.0.0.1:1"], "--secure_aggregation runs on the local worker"),
    (["--task=keyboard", "--secure_sum_bound=0.05", "--initial_clip=0.1"], "--secure_sum_bound=0.05"),
])
def test_secure_aggregation_refuses_what_it_cannot_protect(tmp_path, flags, words):
    p = call_train(*flags, f"--output_dir={tmp_path / 'x'}", "--secure_aggregation")
    assert p.returncode == 2
    assert words in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
