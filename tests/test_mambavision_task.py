"""Classification data and task for MambaVision: the synthetic set (deterministic, balanced, not
linearly separable), the ImageFolder datamodule, the LightningModule, and the CLI end to end."""
import csv
import math
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import zoo
from zoo.cli import ZooCLI
from zoo.data.images import ImagesDataModule, make_shapes, shape_class_names
from zoo.optim import param_groups
from zoo.tasks.classification import ImageClassification
from tests.conftest import ROOT

TINY_NET = dict(model_name="mambavision_t", model_kwargs=dict(dim=8, in_dim=8, depths=[1, 1, 2, 1],
                                                              num_heads=[1, 1, 2, 2], window_size=[8, 8, 2, 1]))


def tiny_args(root_dir, *extra: str) -> list[str]:
    """The shipped config with a network and data small enough for a CPU test (32 px images)."""
    return [
        "--config", str(ROOT / "configs" / "mambavision.yaml"),
        f"--trainer.default_root_dir={root_dir}",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
        "--model.model_kwargs.dim=8", "--model.model_kwargs.in_dim=8", "--model.model_kwargs.depths=[1, 1, 2, 1]",
        "--model.model_kwargs.num_heads=[1, 1, 2, 2]", "--model.model_kwargs.window_size=[8, 8, 2, 1]",
        "--model.sample_images=4",
        "--data.image_size=32", "--data.num_train=16", "--data.num_val=8", "--data.batch_size=4",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------------
# synthetic data

def test_shapes_are_deterministic_balanced_and_named():
    a, la = make_shapes(12, 24, 6, seed=0)
    b, lb = make_shapes(12, 24, 6, seed=0)
    c, _ = make_shapes(12, 24, 6, seed=1)
    assert a.dtype == torch.uint8 and a.shape == (12, 3, 24, 24)
    assert torch.equal(a, b) and torch.equal(la, lb) and not torch.equal(a, c)
    assert torch.equal(make_shapes(4, 24, 6, seed=0, start=5)[0], a[5:9])  # image i depends on i only
    assert la.bincount().tolist() == [2] * 6
    assert shape_class_names(8)[:5] == ["disk/solid", "square/solid", "triangle/solid", "cross/solid",
                                        "disk/stripes"]
    with pytest.raises(ValueError, match="num_classes=13"):
        shape_class_names(13)


def _ridge_accuracy(f_train, y_train, f_val, y_val, classes, lam=100.0):
    """Validation accuracy of a ridge-regression linear classifier on standardised features."""
    mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
    add1 = lambda f: torch.cat([(f - mu) / sd, torch.ones(len(f), 1)], 1)  # noqa: E731
    x = add1(f_train)
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(x.shape[1]), x.T @ F.one_hot(y_train, classes).float())
    return (add1(f_val) @ w).argmax(1).eq(y_val).float().mean().item()


def test_linear_model_on_pixels_is_at_chance_but_classes_are_learnable():
    xt, yt = make_shapes(2000, 20, 8, split="train")
    xv, yv = make_shapes(600, 20, 8, split="val")
    pixels = lambda x: x.float().flatten(1) / 255  # noqa: E731
    assert _ridge_accuracy(pixels(xt), yt, pixels(xv), yv, 8) < 0.2  # chance: 0.125

    def spectrum(x):  # a fixed nonlinear, translation-invariant feature: |FFT| of the centred image
        g = x.float() / 255
        return torch.fft.rfft2(g - g.mean((2, 3), keepdim=True)).abs().flatten(1)
    assert _ridge_accuracy(spectrum(xt), yt, spectrum(xv), yv, 8) > 0.4


# ----------------------------------------------------------------------------------------------------
# folder data

def _write_folder(root, classes, per_class=3, size=20, seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{c}{i}.png")


def test_image_folder_datamodule(tmp_path):
    _write_folder(tmp_path / "train", ["cat", "dog"])
    _write_folder(tmp_path / "val", ["dog"], per_class=2)
    dm = ImagesDataModule(root=str(tmp_path), num_classes=2, image_size=16, batch_size=4, input_norm="zscore")
    dm.setup("fit")
    assert dm.classes == ["cat", "dog"] and dm.scaler.fitted
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["image"].max() > 1.5  # raw [0, 255] values, not normalised
    val = next(iter(dm.val_dataloader()))
    assert val["label"].tolist() == [1, 1]  # "dog" keeps the training index although val has one class
    _write_folder(tmp_path / "bad" / "val", ["bird"])
    _write_folder(tmp_path / "bad" / "train", ["cat", "dog"])
    with pytest.raises(ValueError, match="bird"):
        ImagesDataModule(root=str(tmp_path / "bad"), num_classes=2, image_size=16).setup("fit")


# ----------------------------------------------------------------------------------------------------
# task

def test_norm_shorthand_and_weight_decay_groups():
    model = ImageClassification(num_classes=4, norm="group", **TINY_NET)
    assert isinstance(model.net.levels[2].blocks[0].norm1, torch.nn.GroupNorm)  # token norm
    assert isinstance(model.net.norm, torch.nn.GroupNorm)  # conv norm
    decay, no_decay = param_groups(model, 0.05)
    ids = {id(p) for p in no_decay["params"]}
    mixer = model.net.levels[2].blocks[0].mixer
    assert id(mixer.A_log) in ids and id(mixer.D) in ids and id(mixer.dt_proj.bias) in ids
    assert id(mixer.in_proj.weight) not in ids and id(model.net.head.weight) not in ids
    with pytest.raises(ValueError, match="mambavision_x"):
        ImageClassification(model_name="mambavision_x")
    # the config's official conv_norm / token_norm give way to norm; another one would be silently overridden
    ImageClassification(num_classes=4, norm="rms", conv_norm="batch", token_norm="layer", **TINY_NET)
    with pytest.raises(ValueError, match=r"^norm='layer' sets both conv_norm and token_norm, and conv_norm='group', "
                                         r"token_norm='rms' is given too; give norm alone, or conv_norm and token_norm$"):
        ImageClassification(num_classes=4, norm="layer", conv_norm="group", token_norm="rms", **TINY_NET)


def test_fit_load_and_predict_csv(tmp_path):
    run = tmp_path / "run"
    cli = ZooCLI(args=["fit", *tiny_args(run, "--model.token_norm=rms")])
    ckpt = run / "checkpoints" / "last.ckpt"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["global_step"] == 2
    assert {"val/top1", "val/top5", "val/loss"} <= set(summary["metrics"])
    assert list((run / "samples").glob("*.png"))

    raw = torch.load(ckpt, weights_only=True)
    hp = raw["hyper_parameters"]
    assert hp["token_norm"] == "rms" and hp["conv_norm"] is None and hp["num_classes"] == 8  # None: official
    assert type(cli.model.net.norm).__name__ == "BatchNormNCHW"  # zoo's batch norm
    assert hp["model_kwargs"]["dim"] == 8 and hp["model_kwargs"]["drop_path_rate"] == 0.05  # merged with the config's
    assert raw["class_names"] == shape_class_names(8)
    model = zoo.load(ckpt)
    assert isinstance(model, ImageClassification) and model.class_names == shape_class_names(8)
    x = torch.rand(2, 3, 32, 32) * 255
    cli.model.eval()
    torch.testing.assert_close(model(x), cli.model(x))
    torch.testing.assert_close(model.input_scaler.shift, cli.datamodule.scaler.shift)

    images = tmp_path / "images"
    images.mkdir()
    for name in ("b", "a", "c"):
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(images / f"{name}.png")
    out = tmp_path / "pred"
    ZooCLI(args=["predict", *tiny_args(run), f"--data.predict_dir={images}", f"--predict_out={out}",
                 f"--ckpt_path={ckpt}"])
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == ["a.png", "b.png", "c.png"]
    probs = [float(rows[0][f"prob_{i}"]) for i in range(1, 6)]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
    assert {rows[0][f"label_{i}"] for i in range(1, 6)} <= set(shape_class_names(8))


def test_training_loss_is_label_smoothed_and_schedule_is_cosine_with_warmup():
    from types import SimpleNamespace
    model = ImageClassification(num_classes=4, label_smoothing=0.2, lr=1e-2, warmup_steps=10, min_lr_ratio=0.1,
                                weight_decay=0.05, **TINY_NET).eval()  # eval: no drop path, fixed BN
    model.log = lambda *a, **k: None  # no trainer to log to
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 32, 32, generator=g) * 255, "label": torch.tensor([0, 1, 2, 3])}
    with torch.no_grad():
        logits = model(batch["image"])
        loss = model.training_step(batch, 0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch["label"], label_smoothing=0.2))
    assert not torch.allclose(loss, F.cross_entropy(logits, batch["label"]))

    model._trainer = SimpleNamespace(estimated_stepping_batches=100)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and conf["lr_scheduler"]["interval"] == "step"
    assert sorted(group["weight_decay"] for group in opt.param_groups) == [0.0, 0.05]
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1e-3) and lrs[9] == pytest.approx(1e-2)             # linear warm-up
    assert lrs[55] == pytest.approx(1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))  # half-way
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] == pytest.approx(1e-3, rel=0.01)
