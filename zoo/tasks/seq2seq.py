"""Sequence-to-sequence with the encoder-decoder Transformer (`zoo.models.transformer.Transformer`).

Training: teacher forcing, cross-entropy with label smoothing (paper: 0.1) over real target tokens
(pads ignored). Validation decodes greedily and logs exact match (the whole output equals the
target); for g2p also the word error rate (fraction of words with any phoneme wrong) and the phoneme
error rate (phoneme edit distance / reference phonemes). Test and predict decode with beam search
(`beam_size`, length penalty `alpha`; beam_size 1 = greedy). `val/loss` is the unsmoothed
cross-entropy. Each validation epoch, `samples/*.txt` (and a wandb table) show a few inputs with
their prediction and target. The optimizer, schedule, throughput and tokenizer checkpointing are
`zoo.tasks.language.TransformerTask`'s.
"""
from __future__ import annotations

import csv
import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch.nn.utils.rnn import pad_sequence
from torchmetrics.text import WordErrorRate

from zoo.data.contract import DataInfo
from zoo.data.text import BOS, EOS, PAD, UNK, Tokenizer
from zoo.models.transformer import Transformer, TransformerConfig, check_args
from zoo.optim import check_schedule
from zoo.samples import log_text
from zoo.tasks.language import SCHEDULERS, TransformerTask


class Seq2Seq(TransformerTask):
    """Encoder-decoder Transformer task.

    Args:
        net: the network's architecture (`zoo.models.transformer.TransformerConfig`: d_model, n_heads,
            num_encoder_layers, num_decoder_layers, d_ff, dropout, norm, norm_position, max_len,
            pos_encoding, activation, bias, share_embeddings, tie_embeddings). share_embeddings applies
            when the datamodule has one vocabulary (the algorithmic tasks; a warning says when it
            cannot, e.g. g2p).
        label_smoothing: epsilon of the smoothed cross-entropy (paper: 0.1).
        lr, weight_decay, betas, eps, scheduler, warmup_steps, min_lr_ratio: as `LanguageModel`
            (defaults: the paper's Adam betas/eps and "noam" warm-up schedule, lr=1 is its exact rate).
        beam_size, alpha: beam search for test and predict (paper: 4, 0.6); 1 = greedy.
        num_samples: examples shown each validation epoch.
    """

    monitor = ("val/exact_match", "max")
    prediction_files = ("predictions.tsv",)

    def __init__(self, net: TransformerConfig = TransformerConfig(d_model=128, n_heads=4, num_encoder_layers=2,
                                                                  num_decoder_layers=2, max_len=128,
                                                                  share_embeddings=True),
                 label_smoothing: float = 0.1, lr: float = 1.0,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9,
                 scheduler: str = "noam", warmup_steps: int = 400, min_lr_ratio: float = 0.0,
                 beam_size: int = 4, alpha: float = 0.6, num_samples: int = 4,
                 optimizer: Optional[OptimizerCallable] = None, lr_scheduler: Optional[LRSchedulerCallable] = None):
        super().__init__(optimizer, lr_scheduler)
        check_schedule(scheduler, SCHEDULERS)
        self.net_config = net = TransformerConfig.of(net)
        check_args(net)  # before any data is read
        if beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {beam_size}")
        self.save_hyperparameters()
        self.per = WordErrorRate()

    def _tokenizers_from(self, info: DataInfo) -> dict[str, Tokenizer]:
        return {"src": info.tokenizers["src"], "tgt": info.tokenizers["tgt"]}

    def _build(self, tokenizers: dict[str, Tokenizer]) -> Transformer:
        cfg = self.net_config
        if cfg.share_embeddings and tokenizers["src"] != tokenizers["tgt"]:
            warnings.warn("share_embeddings=True but source and target have different vocabularies: "
                          "the embeddings are not shared")
            cfg = dataclasses.replace(cfg, share_embeddings=False)
        return cfg.build(src_vocab_size=len(tokenizers["src"]), tgt_vocab_size=len(tokenizers["tgt"]), pad_id=PAD)

    @property
    def is_g2p(self) -> bool:
        return self.tokenizers["tgt"].level == "word"

    def _count_tokens(self, batch) -> int:
        return int((batch["src"] != PAD).sum() + (batch["tgt"][:, 1:] != PAD).sum())

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """(N, S) source ids, (N, L) target input ids (bos + target) -> (N, L, V_tgt) logits."""
        self._require_net()
        return self.net(src, tgt_in)

    def _loss(self, batch, smoothing: float) -> torch.Tensor:
        logits = self(batch["src"], batch["tgt"][:, :-1])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["tgt"][:, 1:].flatten(), ignore_index=PAD,
                               label_smoothing=smoothing)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch, self.hparams.label_smoothing)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["src"]))
        return loss

    # -- decoding ----------------------------------------------------------------------------------------
    def decode_ids(self, src: torch.Tensor, beam_size: int = 1, use_cache: bool = True) -> torch.Tensor:
        """(N, S) source ids -> (N, T) output ids (eos included, pads after it)."""
        self._require_net()
        max_out = min(self.net_config.max_len - 1, src.shape[1] + 10)
        if beam_size == 1:
            return self.net.greedy_decode(src, BOS, EOS, max_out, use_cache=use_cache)
        return self.net.beam_search(src, BOS, EOS, max_out, beam_size, self.hparams.alpha)

    def transform(self, lines: list[str], beam_size: int | None = None) -> list[str]:
        """Input strings -> output strings. Tokens outside the source vocabulary become <unk> (warned)."""
        self._require_net()
        if isinstance(lines, str):  # a str would be taken as one input per character
            raise TypeError(f"transform takes a list of inputs, got the str {lines[:40]!r}; pass [{lines[:40]!r}]")
        if not lines:
            return []
        src_tok = self.tokenizers["src"]
        src_tok.unknown = 0
        ids = [torch.tensor(src_tok.encode(s) or [UNK], dtype=torch.long) for s in lines]  # never all pads
        max_len = self.net_config.max_len
        for line, t in zip(lines, ids):
            if len(t) > max_len:
                raise ValueError(f"input {line[:40]!r}{'...' if len(line) > 40 else ''} has {len(t)} tokens, more "
                                 f"than the model's max_len={max_len}")
        if src_tok.unknown:
            warnings.warn(f"{src_tok.unknown} input token(s) not in the vocabulary were mapped to <unk>")
        src = pad_sequence(ids, batch_first=True, padding_value=PAD).to(self.device)
        out = self.decode_ids(src, self.hparams.beam_size if beam_size is None else beam_size)
        return [self.tokenizers["tgt"].decode(o) for o in out]

    def _strings(self, ids: torch.Tensor, which: str) -> list[str]:
        return [self.tokenizers[which].decode(row) for row in ids]

    # -- evaluation --------------------------------------------------------------------------------------
    def _evaluate(self, batch, stage: str, beam_size: int) -> tuple[list[str], list[str]]:
        n = len(batch["src"])
        self.log(f"{stage}/loss", self._loss(batch, 0.0), batch_size=n, prog_bar=stage == "val", sync_dist=True)
        preds = self._strings(self.decode_ids(batch["src"], beam_size), "tgt")
        targets = self._strings(batch["tgt"], "tgt")
        exact = sum(p == t for p, t in zip(preds, targets)) / n
        self.log(f"{stage}/exact_match", exact, batch_size=n, prog_bar=stage == "val", sync_dist=True)
        if self.is_g2p:
            self.log(f"{stage}/wer", 1.0 - exact, batch_size=n, sync_dist=True)
            self.per.update(preds, targets)
            self.log(f"{stage}/per", self.per, on_epoch=True, batch_size=n)
        return preds, targets

    def validation_step(self, batch, batch_idx):
        preds, targets = self._evaluate(batch, "val", beam_size=1)
        if batch_idx == 0 and self.hparams.num_samples:
            k = self.hparams.num_samples
            rows = [[s, p, t] for s, p, t in zip(self._strings(batch["src"][:k], "src"), preds[:k], targets[:k])]
            log_text(self, "samples/val", ["input", "prediction", "target"], rows)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test", beam_size=self.hparams.beam_size)

    def predict_step(self, batch, batch_idx):
        return {"input": batch["text"], "output": self.transform(batch["text"])}

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Appends `input<TAB>output` rows to `<out_dir>/predictions.tsv` (Python's csv "excel-tab" dialect:
        a field holding a tab, quote or newline is quoted, so every row reads back as two fields)."""
        with open(out_dir / "predictions.tsv", "a", encoding="utf-8", newline="") as f:
            csv.writer(f, dialect="excel-tab", lineterminator="\n").writerows(zip(outputs["input"], outputs["output"]))
