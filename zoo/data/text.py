"""Text for the zoo's Transformer: tokenizers, the built-in corpus and the language-model datamodule.

`Tokenizer` (character- or word-level) has the preprocessing options of classic NLP pipelines: case
folding (`lowercase`), stop-word removal (`stop_words`: a list, or "english" for `ENGLISH_STOP_WORDS`,
word level only), a vocabulary built on the training split (`min_freq`, `max_size`), the special
tokens <pad>=0, <bos>=1, <eos>=2, <unk>=3, and unknown-token handling: text outside the vocabulary
maps to <unk> and is counted (`Tokenizer.unknown`), never an error. Its state is plain data
(`state_dict()` / `Tokenizer.from_state(d)`) so it travels in checkpoints.

The built-in corpus (`stdlib_corpus()`) is documentation that ships with every Python install: the
language reference topics that `help()` shows (`pydoc_data.topics`) followed by the docstrings of a
fixed list of standard-library modules and their public classes, functions and methods (`inspect`).
It is deterministic for a given Python version (about 0.9 M characters on 3.11).

`LMDataModule` serves any UTF-8 text file (`path`; a leading byte-order mark is dropped) or that
corpus, split into a leading training part and a trailing validation part (`val_fraction`, as
nanoGPT). Batches: {"input": (B, L) int64, "target": (B, L) int64} with target = input shifted by
one; training windows start at random positions (nanoGPT's sampling; an epoch is as many windows as
tile the training text once), validation windows tile the validation text. Predict batches are
{"text": [str]}: prompts, one per line of `predict_path` ("-" reads stdin); the model encodes them
with the tokenizer from its checkpoint.
"""
from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.sampling import EpochSampler, training_seed

__all__ = ["Tokenizer", "SPECIALS", "PAD", "BOS", "EOS", "UNK", "ENGLISH_STOP_WORDS", "LEVELS",
           "stdlib_corpus", "STDLIB_MODULES", "LMDataModule", "TokenWindows", "read_lines"]

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
LEVELS = ("char", "word")
UNK_CHAR = "\ufffd"  # how <unk> is shown when character-level ids are decoded to text

# A short classic English stop-word list (function words), for `stop_words="english"`.
ENGLISH_STOP_WORDS = tuple(
    "a an and are as at be but by for from has have he her his i if in into is it its me my no not of on "
    "or our she so than that the their them then there these they this to was we were what when which who "
    "will with you your".split())

_WORD_RE = re.compile(r"\w+|[^\w\s]")


class Tokenizer:
    """Character- or word-level tokenizer with a vocabulary built on training text.

    Args:
        level: "char" (every character is a token) or "word" (runs of word characters and single
            punctuation marks; whitespace separates and is not kept).
        lowercase: case folding (`str.casefold`) before tokenizing.
        stop_words: words removed after case folding (word level only): a list, or "english".
        min_freq: tokens seen fewer times in the training text map to <unk>.
        max_size: keep only the most frequent tokens (ties by first appearance), specials excluded.
        tokens: the vocabulary (without specials); given when restoring, built by `fit` otherwise.
    """

    def __init__(self, level: str = "char", lowercase: bool = False, stop_words: list[str] | str | None = None,
                 min_freq: int = 1, max_size: int | None = None, tokens: list[str] | None = None):
        if level not in LEVELS:
            raise ValueError(f"tokenizer level {level!r} is not one of {LEVELS}")
        if stop_words == "english":
            stop_words = list(ENGLISH_STOP_WORDS)
        elif isinstance(stop_words, str):
            raise ValueError(f"stop_words={stop_words!r}: give a list of words or 'english'")
        if stop_words and level != "word":
            raise ValueError("stop_words apply to word-level tokenizers only (level='word'), got level='char'")
        if min_freq < 1:
            raise ValueError(f"min_freq must be >= 1, got {min_freq}")
        self.level, self.lowercase, self.min_freq, self.max_size = level, lowercase, min_freq, max_size
        self.stop_words = sorted({w.casefold() if lowercase else w for w in stop_words or []})
        self._stop = set(self.stop_words)
        self.unknown = 0  # tokens mapped to <unk> by encode() since the last reset
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {}
        if tokens is not None:
            self._set_tokens(tokens)

    def _set_tokens(self, tokens: list[str]) -> None:
        clash = [t for t in tokens if t in SPECIALS]
        if clash:
            raise ValueError(f"vocabulary tokens {clash} clash with the special tokens {SPECIALS}")
        self.itos = list(SPECIALS) + list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def fitted(self) -> bool:
        return bool(self.stoi)

    def split(self, text: str) -> list[str]:
        """Text -> token strings after case folding and stop-word removal."""
        if self.lowercase:
            text = text.casefold()
        if self.level == "char":
            return list(text)
        words = _WORD_RE.findall(text)
        return [w for w in words if w not in self._stop] if self._stop else words

    def fit(self, texts: list[str] | str) -> "Tokenizer":
        """Build the vocabulary from training text(s): tokens by descending frequency, ties in order of
        first appearance; those below min_freq or beyond max_size are left to <unk>."""
        counts: Counter = Counter()
        for text in [texts] if isinstance(texts, str) else texts:
            counts.update(self.split(text))
        kept = [t for t, c in counts.most_common() if c >= self.min_freq and t not in SPECIALS]
        if self.max_size is not None:
            kept = kept[: self.max_size]
        if not kept:
            raise ValueError("no tokens to build a vocabulary from: the training text is empty "
                             "(after case folding and stop-word removal)")
        self._set_tokens(kept)
        return self

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids; tokens outside the vocabulary become <unk> and are added to `self.unknown`."""
        if not self.fitted:
            raise RuntimeError("tokenizer has no vocabulary: call fit(training_text) or restore it from_state")
        ids = [self.stoi.get(t, UNK) for t in self.split(text)]
        self.unknown += ids.count(UNK)
        return ([BOS] if bos else []) + ids + ([EOS] if eos else [])

    def decode(self, ids, skip_specials: bool = True) -> str:
        """Ids -> text. Stops at <eos>; drops <pad>/<bos> (and shows <unk> as U+FFFD for char level,
        "<unk>" for word level) when skip_specials, else shows every special by name. Words are joined
        by single spaces (word-level decoding does not restore the original spacing)."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == EOS and skip_specials:
                break
            if i in (PAD, BOS) and skip_specials:
                continue
            if i == UNK and skip_specials and self.level == "char":
                out.append(UNK_CHAR)
                continue
            out.append(self.itos[i] if 0 <= i < len(self.itos) else SPECIALS[UNK])
        return ("" if self.level == "char" else " ").join(out)

    def state_dict(self) -> dict:
        """Plain data (strings, numbers, lists) that `from_state` restores."""
        return {"level": self.level, "lowercase": self.lowercase, "stop_words": list(self.stop_words),
                "min_freq": self.min_freq, "max_size": self.max_size, "tokens": self.itos[len(SPECIALS):]}

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        return cls(**state)

    def __eq__(self, other) -> bool:
        return isinstance(other, Tokenizer) and self.state_dict() == other.state_dict()

    def __repr__(self) -> str:
        return (f"Tokenizer(level={self.level!r}, lowercase={self.lowercase}, stop_words={len(self.stop_words)}, "
                f"vocab={len(self)})")


# ---------------------------------------------------------------------------------------------------
# the built-in corpus

STDLIB_MODULES = (
    "abc argparse ast asyncio base64 bisect calendar collections contextlib copy csv dataclasses datetime "
    "decimal difflib email enum fractions functools glob gzip hashlib heapq html http.client inspect io "
    "itertools json logging math operator os pathlib pickle queue random re shutil socket sqlite3 "
    "statistics string struct subprocess tarfile tempfile textwrap threading time timeit typing unittest "
    "urllib.parse uuid warnings weakref zipfile").split()


def _docstrings(module_name: str) -> list[str]:
    """The docstrings of a module, its public classes and functions and their methods, in name order."""
    mod = importlib.import_module(module_name)
    docs = [inspect.getdoc(mod) or ""]
    for name, obj in sorted(vars(mod).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        docs.append(inspect.getdoc(obj) or "")
        if inspect.isclass(obj):
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, property)):
                    docs.append(inspect.getdoc(member) or "")
    return [d for d in docs if d]


def stdlib_corpus(modules: tuple[str, ...] | list[str] = STDLIB_MODULES) -> str:
    """Python's own documentation: `help()` topics (pydoc_data) + the docstrings of `modules`."""
    parts = []
    try:
        from pydoc_data.topics import topics
        parts += [topics[k] for k in sorted(topics)]
    except ImportError:  # a stripped Python without pydoc_data: docstrings only
        warnings.warn("pydoc_data is not installed: the built-in corpus holds module docstrings only")
    for name in modules:
        parts += _docstrings(name)
    return "\n\n".join(p.strip() for p in parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# datasets

class TokenWindows(Dataset):
    """Windows of L + 1 tokens from a token stream, window i starting at token i * stride:
    item -> {"input": (L,), "target": (L,)} int64. `name` says in errors which text it is."""

    def __init__(self, tokens: torch.Tensor, block_size: int, stride: int, name: str = "text"):
        if len(tokens) < block_size + 1:
            raise ValueError(f"{name} has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1}")
        self.tokens, self.block_size, self.stride = tokens, block_size, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.block_size - 1) // self.stride + 1

    def __getitem__(self, i: int) -> dict:
        start = i * self.stride
        chunk = self.tokens[start:start + self.block_size + 1]
        return {"input": chunk[:-1], "target": chunk[1:]}


class _Lines(Dataset):
    def __init__(self, lines: list[str]):
        self.lines = lines

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> str:
        return self.lines[i]


def _collate_text(batch: list[str]) -> dict:
    return {"text": list(batch)}


def read_lines(path: str) -> list[str]:
    """Non-empty lines of a UTF-8 text file (`read_text`), or of stdin for "-" (line ends stripped).
    Empty lines are skipped with a warning giving their count."""
    if path != "-" and not Path(path).exists():
        raise FileNotFoundError(f"--data.predict_path {path!r}: no such file (a text file, one input per line, or - "
                                "for stdin)")
    text = sys.stdin.read() if path == "-" else read_text(path, "--data.predict_path")
    lines = text.splitlines()
    kept = [ln for ln in lines if ln.strip()]
    if len(kept) < len(lines):
        warnings.warn(f"{path}: skipped {len(lines) - len(kept)} empty line(s)")
    if not kept:
        raise ValueError(f"{path}: no non-empty lines to predict from")
    return kept


def read_text(path: str, what: str = "text file") -> str:
    """A UTF-8 text file's text, without a leading byte-order mark (it is no character of the text);
    errors name the file as `what`."""
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{what} {path!r} is a folder; expected a UTF-8 text file")
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e})") from None


class LMDataModule(ZooDataModule):
    """Language modelling on a UTF-8 text file, or on Python's own documentation by default.

    Args:
        path: a UTF-8 text file; None for the built-in corpus (`stdlib_corpus()`).
        level, lowercase, stop_words, min_freq, max_size: the `Tokenizer`, fitted on the training split.
        block_size: L, tokens per training window (the model's context).
        batch_size: windows per batch.
        val_fraction: trailing fraction of the text held out for validation.
        max_chars: use only the first `max_chars` characters of the text (None: all).
        predict_path: prompts for `predict`, one per line ("-" for stdin).
        max_new_tokens, greedy: what `predict` generates per prompt (argmax if greedy, else sampled at
            the model's temperature / top_k).
        num_workers: DataLoader workers.
    """

    def __init__(self, path: str | None = None, level: str = "char", lowercase: bool = False,
                 stop_words: list[str] | str | None = None, min_freq: int = 1, max_size: int | None = None,
                 block_size: int = 128, batch_size: int = 32, val_fraction: float = 0.1,
                 max_chars: int | None = None, predict_path: str | None = None, max_new_tokens: int = 200,
                 greedy: bool = False, num_workers: int = 0):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        for name, value, least in (("block_size", block_size, 1), ("batch_size", batch_size, 1),
                                   ("max_new_tokens", max_new_tokens, 0), ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"{name}={value} must be >= {least}")
        self.save_hyperparameters()
        self.tokenizer = Tokenizer(level, lowercase, stop_words, min_freq, max_size)
        self.train_set = self.val_set = self.chars_per_token = None

    def info(self) -> DataInfo:
        hp = self.hparams
        return DataInfo(tokenizers={"text": self.tokenizer}, chars_per_token=self.chars_per_token,
                        seq_len=hp.block_size, max_new_tokens=hp.max_new_tokens, greedy=hp.greedy)

    def load_text(self) -> str:
        text = read_text(self.hparams.path) if self.hparams.path else stdlib_corpus()
        return text[: self.hparams.max_chars] if self.hparams.max_chars else text

    def setup(self, stage: str) -> None:
        hp = self.hparams
        if stage == "predict" or self.train_set is not None:
            return
        text = self.load_text()
        cut = int(len(text) * (1 - hp.val_fraction))
        train_text, val_text = text[:cut], text[cut:]
        self.tokenizer.fit(train_text)
        self.tokenizer.unknown = 0
        train = torch.tensor(self.tokenizer.encode(train_text), dtype=torch.long)
        val = torch.tensor(self.tokenizer.encode(val_text), dtype=torch.long)
        if self.tokenizer.unknown:
            warnings.warn(f"{self.tokenizer.unknown} validation token(s) are not in the vocabulary built on "
                          "the training split and were mapped to <unk>")
        self.chars_per_token = len(val_text) / max(len(val), 1)  # for bits per character
        source = hp.path or "the built-in corpus"
        self.train_set = TokenWindows(train, hp.block_size, 1, f"the training split of {source}")
        self.val_set = TokenWindows(val, hp.block_size, hp.block_size,
                                    f"the validation split (last val_fraction={hp.val_fraction}) of {source}")

    def train_dataloader(self) -> DataLoader:
        # Windows at every start position, sampled at random as nanoGPT does; an epoch draws as many
        # windows as tile the training text once.
        n = len(self.train_set)
        sampler = EpochSampler.for_training(self, n, training_seed(0), self.hparams.batch_size,
                                            num_samples=n // self.hparams.block_size, with_epoch=False)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler, drop_last=True,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers)

    def predict_dataloader(self) -> DataLoader:
        if not self.hparams.predict_path:
            raise ValueError("predict needs --data.predict_path: a text file of prompts, one per line, or - for stdin")
        return DataLoader(_Lines(read_lines(self.hparams.predict_path)), batch_size=1, collate_fn=_collate_text)
