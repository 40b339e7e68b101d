"""The keyboard task's data: parsing, public vocabulary, splits, baselines."""

import numpy as np
import pytest

from tasks import keyboard

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ALICE and BOB_

**ALICE**
Good morrow, Bob; what news?

**BOB**
None, fair Alice.
_Exit ALICE_
Yet I stay.

**SCENE II**
ignored line

**ALICE**
O'er the hills.
"""


def test_parse_play_speeches_and_stage_directions():
    sp = keyboard.parse_play(PLAY)
    assert sp == [("ALICE", ["good", "morrow", "bob", "what", "news"]),
                  ("BOB", ["none", "fair", "alice", "yet", "i", "stay"]),
                  ("ALICE", ["o'er", "the", "hills"])]


def test_real_corpus_matches_the_data_notes():
    plays = keyboard.load_plays()
    assert len(plays) == 38
    assert sum(len(s) for s in plays.values()) == pytest.approx(31_354, rel=0.01)


def test_vocabulary_uses_only_public_text():
    plays = {p: [("X", ["thee", "public"])] for p in keyboard.PUBLIC_PLAYS}
    plays["private-play"] = [("Y", ["zzqprivateword"] * 50)]
    vocab, info = keyboard.build_vocabulary(plays, 500)
    assert "zzqprivateword" not in vocab
    assert vocab[:6] == keyboard.SPECIALS + ["thee", "public"]
    assert len(vocab) == 500 and info["words_from_wordfreq_en"] == 500 - 4 - 2


def test_sequences_shift_and_pad():
    x, y = keyboard.to_sequences([[10, 11, 12]], seq_len=3)
    np.testing.assert_array_equal(x, [[keyboard.BOS, 10, 11], [12, keyboard.EOS, 0]])
    np.testing.assert_array_equal(y, [[10, 11, 12], [keyboard.EOS, 0, 0]])


def test_ngram_baselines_on_toy_data():
    # Train: "5 6" always; test asks for 6 after 5 (bigram right, unigram right only if 6 is the top word).
    x = np.array([[2, 5, 6, 5]]); y = np.array([[5, 6, 5, 6]])
    tx = np.array([[5, 7]]); ty = np.array([[6, 8]])
    b = keyboard.ngram_baselines(x, y, tx, ty, vocab_size=10)
    assert b["bigram_top1"] == 0.5   # 5->6 right, 7->? falls back to top word, wrong
    assert b["unigram_top1"] == 0.0  # top word is 5 (count 2) ... ties: 5 and 6 both 2 -> argmax picks 5


def test_task_splits_and_spec(keyboard_task):
    s = keyboard_task.summary
    assert keyboard_task.population == s["training_clients"] > 1000
    assert s["unseen_eval_clients"] > 100
    assert 0.03 < s["vocabulary"]["oov_rate_private_text"] < 0.25  # 2,000 words here; 10k gives ~6%
    ds = keyboard_task.client_dataset(0, 1)
    x, y = next(iter(ds))
    assert x.shape[1] == y.shape[1] == 20 and x.dtype.name == "int32"
    # A client's per-round subset is capped and depends on the round seed.
    sizes = [len(x) for x in keyboard_task.evaluate.args[0].train_x]  # the task's data (evaluate's first argument)
    big = int(np.argmax(sizes))
    assert sizes[big] > 16 and len(list(keyboard_task.client_dataset(big, 1).unbatch())) == 16
    a = np.concatenate([b[0].numpy() for b in keyboard_task.client_dataset(big, 1)])
    b = np.concatenate([b[0].numpy() for b in keyboard_task.client_dataset(big, 2)])
    assert len(a) == 16 and not np.array_equal(np.sort(a, 0), np.sort(b, 0))


def test_tuning_users_are_set_apart_from_every_run_that_is_not_a_tuning_run():
    """--tuning_clients: the same users for every --seed, never trained or evaluated on by a normal run;
    --tuning_run trains and evaluates only on them; tuning_note gives the report's line for each kind of run."""
    from tff_pipeline.config import ConfigError, make

    small = dict(vocab_size=2000, model_dim=32, heads=2, ff_dim=64)
    data = lambda **kw: keyboard._Data(make(**small, **kw))  # noqa: E731
    plain, apart, apart_seed2 = data(), data(tuning_clients=150), data(tuning_clients=150, seed=2)
    tuning, tuning_seed2 = data(tuning_clients=150, tuning_run=True), data(tuning_clients=150, tuning_run=True, seed=2)
    group = set(apart.tuning_ids)
    assert len(group) == 150 and apart_seed2.tuning_ids == apart.tuning_ids == tuning.tuning_ids
    for normal in (apart, apart_seed2):  # never trained or evaluated on by a run that is not a tuning run
        assert not group & (set(normal.train_ids) | set(normal.unseen_ids))
    for t in (tuning, tuning_seed2):  # a tuning run touches the group only: a tenth unseen, the rest trained
        assert set(t.train_ids) | set(t.unseen_ids) <= group and len(t.unseen_ids) == 15
        assert 125 <= len(t.train_ids) <= 135  # a few have no training text
    assert len(group & set(plain.train_ids)) >= 120  # without the flag they are ordinary users
    assert len(apart.train_ids) < len(plain.train_ids) == 1139
    assert apart.summary["tuning_clients_set_apart"] == 150
    assert keyboard.tuning_note(0, False) == ""
    assert "this run never trained on them" in keyboard.tuning_note(150, False)
    assert keyboard.tuning_note(150, True).startswith("This is a tuning run (--tuning_run)")
    with pytest.raises(ConfigError, match="give --tuning_clients"):
        make(**small, tuning_run=True)
