"""Image classification with any timm model (zoo's MambaVision included) and any `zoo.norm` norm.

The network is `timm.create_model(model_name, **model_kwargs)`. Its norms are MambaVision's own
`conv_norm` / `token_norm` arguments for `mambavision_*`, and for every other model
`zoo.norm.replace_norms(net, norm)` after construction (`norm=None` keeps the network's own norms).
The surgery is a function of the plain-data hyper-parameters, so `zoo.load` rebuilds the same network.
`pretrained=True` starts `fit` from the model's published weights (timm's pretrained_cfg), fetched in
`setup("fit")` only: building the task from its hyper-parameters (`zoo.load`, predict) never downloads.

Training as MambaVision's official recipe, scaled down: cross-entropy with label smoothing, AdamW with
norm weights, biases, layer scales and the SSM's A_log / D excluded from weight decay (`zoo.optim`), a
per-step cosine schedule with linear warm-up (`zoo.optim.lr_schedule`). Validation reports loss and
top-1 / top-k accuracy (torchmetrics; `test` the same on the data's test set) and saves a grid of validation images with their predicted
and true classes each epoch. `predict` writes `predictions.csv` (one row per image: name, then the
top-k class names and probabilities). Class names travel in the checkpoint.
"""
from __future__ import annotations

import csv
import inspect
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torchmetrics.classification import MulticlassAccuracy

from zoo.models import create_model, failing_module
from zoo.norm import NORM_KINDS, norm_spec
from zoo.optim import check_schedule
from zoo.samples import image_grid, log_image
from zoo.scaling import InputScaler
from zoo.tasks.base import ZooModule


class ImageClassification(ZooModule):
    """Image classifier: any timm model with any `zoo.norm` norm.

    Args:
        model_name: a timm model name ("resnet18", "convnext_atto", "mambavision_t", ...; `import zoo`
            registers zoo's).
        num_classes, in_chans: head size and input channels.
        norm: a `zoo.norm` kind for every norm of the network, put in by `zoo.norm.replace_norms`
            (MambaVision: sets both conv_norm and token_norm); None keeps the network's own norms.
        norm_skip: class names of norm-like modules `replace_norms` leaves as they are (its `skip`), e.g.
            ["GlobalResponseNorm"] for ConvNeXt-V2, whose GRN no registry kind replaces.
        conv_norm, token_norm: MambaVision's own norm arguments (other models refuse them): the norm of
            the stem, conv stages and final norm (None: official batch), and of the mixer/attention
            blocks (None: official layer); `norm` sets both (refused next to a non-official one).
        model_kwargs: further `timm.create_model` arguments, e.g. {"channels": [16, 32, 64, 128]} for a
            narrow ResNet, {"dim": 32, "depths": [1, 1, 2, 2]} for MambaVision, {"drop_path_rate": 0.1}.
        pretrained: `fit` starts from the published weights of `model_name` (a tag picks others:
            "mambavision_b.nvlabs_in21k_ft_in1k"): timm downloads them once into its cache (TORCH_HOME,
            HF_HOME) and loads them, with a new head when num_classes differs from theirs. Loaded in
            `setup("fit")`, so `zoo.load` and predict take the weights from the checkpoint only. Norms
            replaced by `norm` (or MambaVision's non-official conv_norm / token_norm) start from the
            pretrained affine parameters only (warned).
        grad_checkpointing: recompute block activations in backward (less memory, ~1/3 more compute).
        label_smoothing: of the training cross-entropy (MambaVision official 0.1).
        lr, weight_decay, betas: AdamW (MambaVision official: 5e-3 for batch 4096, 0.05).
        scheduler: "cosine" (per step, linear warm-up over `warmup_steps`, down to min_lr_ratio * lr) or "none".
        optimizer, lr_scheduler: injected instead of the preset (`ZooModule.configure_optimizers`).
        top_k: the k of the top-k accuracy (clipped to num_classes) and of the predict CSV.
        sample_images: validation images in the grid saved each epoch (0: none).
    """

    monitor = ("val/top1", "max")
    prediction_files = ("predictions.csv",)

    def __init__(
        self,
        model_name: str,
        num_classes: int = 1000,
        in_chans: int = 3,
        norm: Optional[str] = None,
        norm_skip: Optional[list[str]] = None,
        conv_norm: Optional[str] = None,
        token_norm: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        pretrained: bool = False,
        grad_checkpointing: bool = False,
        label_smoothing: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.01,
        top_k: int = 5,
        sample_images: int = 16,
        optimizer: Optional[OptimizerCallable] = None,
        lr_scheduler: Optional[LRSchedulerCallable] = None,
    ):
        super().__init__(optimizer, lr_scheduler)
        check_schedule(scheduler, ("cosine", "none"))
        if num_classes < 2 or top_k < 1:
            raise ValueError(f"need num_classes >= 2 and top_k >= 1, got {num_classes} and {top_k}")
        own = {"num_classes", "in_chans", "norm", "norm_skip", "conv_norm", "token_norm", "pretrained"} & set(model_kwargs or {})
        if own:  # (the model's num_classes follows the data's)
            where = ", ".join(("data." if k == "num_classes" else "model.") + k for k in sorted(own))
            raise ValueError(f"model_kwargs {sorted(own)} are the task's own arguments; set them as {where}")
        self.save_hyperparameters()
        self._net_args = dict(num_classes=num_classes, in_chans=in_chans, norm=norm, norm_skip=norm_skip or (),
                              conv_norm=conv_norm, token_norm=token_norm, **(model_kwargs or {}))
        self.net = create_model(model_name, **self._net_args)
        try:
            if grad_checkpointing:
                self.net.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError, AttributeError) as e:  # timm's ways of saying "not supported"
            raise ValueError(f"grad_checkpointing=True: {model_name} does not support it ({e})") from None
        self.input_scaler = InputScaler(in_chans)
        self.class_names = [str(k) for k in range(num_classes)]
        k = min(top_k, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_topk = MulticlassAccuracy(num_classes, top_k=k, average="micro")
        self.test_top1, self.test_topk = self.val_top1.clone(), self.val_topk.clone()

    # ------------------------------------------------------------------ model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) raw images -> (B, num_classes) logits."""
        if x.dim() != 4:
            raise ValueError(f"expected a batch of raw images (B, C, H, W), got shape {tuple(x.shape)}")
        try:
            return self.net(self.input_scaler(x))
        except (AssertionError, ValueError, TypeError, AttributeError) as e:  # (model_kwargs timm does not check)
            raise ValueError(self._forward_error(e, x)) from e

    def _forward_error(self, e: BaseException, x: torch.Tensor) -> str:
        """What to say when the network refused a batch: where, and what changes it. timm asserts fixed
        input sizes and zoo's norms refuse statistics of one value, which the image size may change,
        except where the network has pooled its features (a head, an SE block): one position per sample
        at any size."""
        model, hp = self.hparams.model_name, self.hparams
        name, module = failing_module(e, self.net)
        text = " ".join(str(e).split()).rstrip(".")
        at = f"{model} on {x.shape[-2]} x {x.shape[-1]} images" + (f", at {name}" if name else "")
        constant = "(the output would be constant)."  # zoo.norm's one-value refusal; its advice after it
        if type(module).__module__ == "zoo.norm" and constant in text and self._one_position_at_any_size(module, x):
            ok = [k for k in NORM_KINDS if not norm_spec(k).pools_positions or norm_spec(k).pools_batch]
            text = text.partition(constant)[0] + constant  # (a larger feature map cannot help here)
            return (f"{at}: {text} It normalizes pooled features, one position per sample at any image size: "
                    f"norm={hp.norm!r} cannot, a norm with statistics per position or over the batch can "
                    f"({', '.join(ok)})")
        if isinstance(e, AssertionError) or type(module).__module__ == "zoo.norm":
            sizes = "--data.image_size sets the images' size" + (
                ", --model.model_kwargs.img_size the model's" if "img_size" in inspect.signature(type(self.net)).parameters else "")
            return f"{at}: {text}; {sizes}"
        return f"{at}: {type(e).__name__}: {text} (model_kwargs {hp.model_kwargs})"

    def _one_position_at_any_size(self, norm: torch.nn.Module, x: torch.Tensor) -> bool:
        """Whether `norm` still sees one position per sample on two of the images at twice their size
        (a network that takes one size only, as a ViT, cannot tell: False)."""
        shapes = []
        hook = norm.register_forward_pre_hook(lambda m, args: shapes.append(args[0].shape))
        training = self.net.training
        try:
            self.net.eval()  # (no batch statistics updated)
            with torch.no_grad():
                self.net(F.interpolate(self.input_scaler(x[:2]).float(), scale_factor=2.0))
        except Exception:  # noqa: BLE001  (the norm raising again is expected; anything else: cannot tell)
            pass
        finally:
            hook.remove()
            self.net.train(training)
        positions = lambda s: s[1] if getattr(norm, "layout", "") == "nlc" else math.prod(s[2:])  # noqa: E731
        return bool(shapes) and all(positions(s) == 1 for s in shapes)

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) raw images -> (B, num_classes) class probabilities."""
        return self(images).float().softmax(-1)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        names = self.data_info().classes
        if stage == "fit" and names is not None:
            if len(names) != self.hparams.num_classes:
                raise ValueError(f"the data has {len(names)} classes ({names[:5]}...), the model "
                                 f"num_classes={self.hparams.num_classes}")
            self.class_names = list(names)
        # here rather than in __init__, so that rebuilding from hparams never downloads; a resumed fit
        # loads them too (from the cache), then its checkpoint replaces them
        if stage == "fit" and self.hparams.pretrained:  # built as published, then its norms replaced
            self.net.load_state_dict(create_model(self.hparams.model_name, pretrained=True, **self._net_args).state_dict())

    def on_save_checkpoint(self, ckpt: dict) -> None:
        super().on_save_checkpoint(ckpt)
        ckpt["class_names"] = list(self.class_names)

    def on_load_checkpoint(self, ckpt: dict) -> None:
        if "class_names" in ckpt:
            self.class_names = list(ckpt["class_names"])

    # ------------------------------------------------------------------ steps

    def training_step(self, batch, batch_idx):
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(1) == batch["label"]).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(logits))
        self.log("train/top1", acc, batch_size=len(logits))
        return loss

    def _evaluate(self, batch, stage: str) -> torch.Tensor:
        logits = self(batch["image"])
        labels = batch["label"]
        top1, topk = getattr(self, f"{stage}_top1"), getattr(self, f"{stage}_topk")
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), prog_bar=True, batch_size=len(logits))
        top1.update(logits, labels)  # logged as metrics: Lightning computes and resets them per epoch
        topk.update(logits, labels)
        self.log(f"{stage}/top1", top1, prog_bar=True)
        self.log(f"{stage}/top{topk.top_k}", topk)
        return logits

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def validation_step(self, batch, batch_idx):
        logits, labels = self._evaluate(batch, "val"), batch["label"]
        n = self.hparams.sample_images
        if batch_idx == 0 and n:
            pred = logits[:n].argmax(1).tolist()
            true = labels[:n].tolist()
            captions = [self.class_names[p] for p in pred]
            grid = image_grid(batch["image"][:n], captions, [p == t for p, t in zip(pred, true)])
            log_image(self, "val/samples (predicted; green = right)", grid)

    def predict_step(self, batch, batch_idx):
        return {"probs": self.predict_proba(batch["image"]), "name": batch["name"]}

    def write_predictions(self, outputs, batch, out_dir: Path) -> None:
        """Appends to `<out_dir>/predictions.csv`: name, label_1, prob_1, ..., label_k, prob_k (most
        probable first)."""
        k = min(self.hparams.top_k, self.hparams.num_classes)
        probs, idx = outputs["probs"].topk(k, dim=-1)
        path = Path(out_dir) / "predictions.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["name"] + [c for i in range(1, k + 1) for c in (f"label_{i}", f"prob_{i}")])
            for name, p, j in zip(outputs["name"], probs.tolist(), idx.tolist()):
                writer.writerow([name] + [v for lp in zip([self.class_names[c] for c in j], [f"{x:.6f}" for x in p])
                                          for v in lp])
