"""Language modelling with the decoder-only Transformer (`zoo.models.transformer.TransformerLM`), and
`TransformerTask`, what it shares with the seq2seq task (`zoo.tasks.seq2seq`): token throughput and
tokenizers that travel in the checkpoint. The optimizer is the base task's (`ZooModule`): AdamW with
zoo's parameter groups and the paper's warm-up ("noam") or a cosine schedule, unless one is injected.

The vocabulary is the datamodule's, built on the training split, so the network is built in
`setup` once the datamodule has fitted its tokenizer; the tokenizer state (plain data) is saved in
the checkpoint (`checkpoint["tokenizers"]`) and `zoo.load` rebuilds the network from it. Gradient
clipping is Lightning's (`trainer.gradient_clip_val`).

Metrics: `train/loss`, `val/loss` (mean next-token cross-entropy, nats), `val/ppl` = exp(val/loss),
`val/bpc` (bits per character of the validation text: total bits / characters, which equals
val/loss / ln 2 for a character-level tokenizer), `train/tokens_per_s`. Each validation epoch,
`samples/*.txt` (and a wandb table) hold continuations of prompts taken from the validation text.
"""
from __future__ import annotations

import math
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics import MeanMetric

from zoo.data.contract import DataInfo
from zoo.data.text import Tokenizer
from zoo.models.transformer import TransformerLM, TransformerLMConfig, check_args
from zoo.optim import check_schedule
from zoo.samples import log_text
from zoo.tasks.base import ZooModule

SCHEDULERS = ("noam", "cosine", "none")


class TransformerTask(ZooModule):
    """Shared by the Transformer tasks. Subclasses set `net_config` (their network's config), define
    `_build(tokenizers)` (the network, from fitted tokenizers), `_tokenizers_from(info)` (from the
    datamodule's `DataInfo`) and `_count_tokens(batch)`; hparams hold lr, weight_decay, betas, eps,
    scheduler, warmup_steps and min_lr_ratio.

    Preset optimizer: AdamW over `param_groups` (no decay for norms, biases, embeddings). Schedules (per
    step): "noam" is the paper's Eq. 3 times `lr` (lr=1 gives the paper's rate), "cosine" warms up
    linearly then decays to min_lr_ratio * lr, "none" is constant after the warm-up.
    """

    def __init__(self, optimizer=None, lr_scheduler=None):
        super().__init__(optimizer, lr_scheduler)
        self.net = None
        self.tokenizers: dict[str, Tokenizer] = {}
        self._t_last = None

    # -- vocabulary and network -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        info = self.data_info()
        if self.net is None and info.tokenizers is not None and stage != "predict":
            self._set_tokenizers(self._tokenizers_from(info))

    def _set_tokenizers(self, tokenizers: dict[str, Tokenizer]) -> None:
        self.tokenizers = tokenizers
        self.net = self._build(tokenizers)

    def on_save_checkpoint(self, ckpt: dict) -> None:
        super().on_save_checkpoint(ckpt)
        ckpt["tokenizers"] = {k: t.state_dict() for k, t in self.tokenizers.items()}

    def on_load_checkpoint(self, ckpt: dict) -> None:
        saved = {k: Tokenizer.from_state(s) for k, s in ckpt["tokenizers"].items()}
        if self.net is None:
            self._set_tokenizers(saved)
        elif saved != self.tokenizers:
            raise ValueError("the checkpoint's vocabulary differs from the one this datamodule built on its "
                             "training split; use the data settings the checkpoint was trained with")

    def _require_net(self) -> None:
        if self.net is None:
            raise RuntimeError(f"{type(self).__name__} has no network yet: it is built from the datamodule's "
                               "vocabulary in trainer.fit, or from a checkpoint by zoo.load")

    # -- throughput -----------------------------------------------------------------------------------
    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # tokens per second over the step, data loading included; the first step is warm-up
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            self.log("train/tokens_per_s", self._count_tokens(batch) / (now - self._t_last))
        self._t_last = now

    def on_validation_start(self) -> None:
        self._t_last = None  # validation time is not training time


class LanguageModel(TransformerTask):
    """Next-token language modelling with `TransformerLM`.

    Args:
        net: the network's architecture (`zoo.models.transformer.TransformerLMConfig`: d_model, n_heads,
            n_layers, d_ff, dropout, norm, norm_position, pos_encoding, activation, bias, tie_embeddings).
        block_size: the context length, the network's max_len (follows data.block_size).
        lr, weight_decay, betas, eps: AdamW.
        scheduler, warmup_steps, min_lr_ratio: learning-rate schedule ("noam", "cosine", "none").
        optimizer, lr_scheduler: injected instead of the preset (`ZooModule.configure_optimizers`).
        num_samples, sample_tokens, temperature, top_k: text samples each validation epoch, and the
            sampling settings of `predict` (how many tokens and greedy or not come from the datamodule:
            `DataInfo.max_new_tokens` / `greedy`).
    """

    prediction_files = ("continuations.txt",)

    def __init__(self, net: TransformerLMConfig = TransformerLMConfig(d_model=128, n_heads=4, n_layers=4),
                 block_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-9, scheduler: str = "cosine",
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, num_samples: int = 2,
                 sample_tokens: int = 120, temperature: float = 0.8, top_k: int | None = None,
                 optimizer: Optional[OptimizerCallable] = None, lr_scheduler: Optional[LRSchedulerCallable] = None):
        super().__init__(optimizer, lr_scheduler)
        check_schedule(scheduler, SCHEDULERS)
        self.net_config = net = TransformerLMConfig.of(net)
        check_args(net)  # before any data is read
        self.save_hyperparameters()
        self.val_nll = MeanMetric()

    def _tokenizers_from(self, info: DataInfo) -> dict[str, Tokenizer]:
        if info.seq_len is not None and info.seq_len > self.hparams.block_size:
            raise ValueError(f"data block_size={info.seq_len} exceeds the model's block_size={self.hparams.block_size}")
        self.chars_per_token = info.chars_per_token or 1.0
        return {"text": info.tokenizers["text"]}

    def _build(self, tokenizers: dict[str, Tokenizer]) -> TransformerLM:
        return self.net_config.build(vocab_size=len(tokenizers["text"]), max_len=self.hparams.block_size)

    @property
    def tokenizer(self) -> Tokenizer:
        return self.tokenizers["text"]

    def _count_tokens(self, batch) -> int:
        return batch["input"].numel()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N, L, V) next-token logits."""
        self._require_net()
        return self.net(ids)

    def _loss(self, batch) -> torch.Tensor:
        logits = self(batch["input"])
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["target"].flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input"]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_nll.update(self._loss(batch), weight=batch["target"].numel())  # per-token mean, synced
        if batch_idx == 0:
            self._prompts = batch["input"][: self.hparams.num_samples, : self.hparams.block_size // 4]

    def on_validation_epoch_end(self) -> None:
        if self.val_nll.update_count == 0:
            return
        loss = float(self.val_nll.compute())
        self.val_nll.reset()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/ppl", math.exp(min(loss, 80.0)))
        self.log("val/bpc", loss / math.log(2) / getattr(self, "chars_per_token", 1.0))
        hp = self.hparams
        if self.trainer.sanity_checking or hp.num_samples == 0:
            return
        n_new = min(hp.sample_tokens, hp.block_size - self._prompts.shape[1])
        g = torch.Generator(device=self.device).manual_seed(0)
        out = self.net.generate(self._prompts, n_new, temperature=hp.temperature, top_k=hp.top_k, generator=g)
        rows = [[self.tokenizer.decode(p), self.tokenizer.decode(o[p.shape[0]:])]
                for p, o in zip(self._prompts, out)]
        log_text(self, "samples/val", ["prompt", "continuation"], rows)

    # -- inference -------------------------------------------------------------------------------------
    def continue_text(self, prompt: str, max_new_tokens: int = 200, greedy: bool = False,
                      generator: torch.Generator | None = None) -> str:
        """Continue a prompt (str) with the model's sampling settings; returns the new text only (word
        level: after a space, so that prompt + continuation reads as text).

        Characters outside the vocabulary become <unk> (a warning gives the count); a prompt longer than
        the context (block_size) is cut to its last block_size tokens, with a warning. Past the context,
        each new token sees the last block_size tokens (a sliding window, uncached)."""
        self._require_net()
        if not isinstance(prompt, str):
            raise TypeError(f"continue_text takes one prompt, a str, got {type(prompt).__name__}")
        hp = self.hparams
        self.tokenizer.unknown = 0
        ids = self.tokenizer.encode(prompt)
        if self.tokenizer.unknown:
            warnings.warn(f"prompt {prompt[:40]!r}: {self.tokenizer.unknown} token(s) not in the vocabulary "
                          "were mapped to <unk>")
        if not ids:
            raise ValueError(f"prompt {prompt!r} has no tokens after preprocessing")
        if len(ids) > hp.block_size:
            warnings.warn(f"prompt of {len(ids)} tokens cut to its last {hp.block_size}, the model's context")
            ids = ids[-hp.block_size:]
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        use_cache = len(ids) + max_new_tokens <= hp.block_size
        out = self.net.generate(x, max_new_tokens, greedy=greedy, temperature=hp.temperature, top_k=hp.top_k,
                                use_cache=use_cache, generator=generator)
        text = self.tokenizer.decode(out[0, len(ids):])
        return " " + text if text and self.tokenizer.level == "word" else text

    def predict_step(self, batch, batch_idx):
        info = self.data_info()  # a datamodule that does not say keeps continue_text's defaults
        given = {k: getattr(info, k) for k in ("max_new_tokens", "greedy") if getattr(info, k) is not None}
        g = torch.Generator(device=self.device).manual_seed(batch_idx)
        return {"prompt": batch["text"],
                "continuation": [self.continue_text(p, generator=g, **given) for p in batch["text"]]}

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Appends prompt + continuation to `<out_dir>/continuations.txt`, one block per prompt."""
        with open(out_dir / "continuations.txt", "a", encoding="utf-8") as f:
            for p, c in zip(outputs["prompt"], outputs["continuation"]):
                f.write(f"=== prompt: {p}\n{p}{c}\n\n")
