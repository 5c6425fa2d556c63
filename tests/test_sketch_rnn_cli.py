"""Sketch-RNN end to end through the CLI: fit a few steps with configs/sketch_rnn.yaml, load the
checkpoint safely, check the scale factor travels with it, predict SVG + PNG grids, resume exactly."""
import json

import numpy as np
import torch
from PIL import Image

import zoo
from zoo.cli import ZooCLI
from zoo.data.sketches import SketchDataModule, scale_factor
from zoo.tasks.sketch import SketchRNNTask
from tests.conftest import assert_same_weights, cli_args, interrupted_then_resumed


def tiny_sketch_args(root, *extra):
    return cli_args(
        "sketch_rnn", root,
        "--model.net.enc_rnn_size=8", "--model.net.dec_rnn_size=16", "--model.net.z_size=4", "--model.net.num_mixture=2",
        "--model.num_images=2", "--model.max_seq_len=40",
        "--data.builtin=synthetic", "--data.classes=[circle, house]", "--data.num_per_class=10",
        "--data.batch_size=4", "--data.max_seq_len=40",
        *extra,
    )


def test_fit_load_predict(tmp_path):
    cli = ZooCLI(args=["fit", *tiny_sketch_args(tmp_path / "run", "--model.net.norm=batch")])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["global_step"] == 4
    for key in ("val/L_R", "val/L_KL", "val/L_s", "val/L_p", "train/L_R", "train/L_KL"):
        assert key in summary["metrics"], key
    samples = {p.name.rsplit("_epoch", 1)[0] for p in (tmp_path / "run" / "samples").glob("*.png")}
    assert {"val_samples", "val_reconstructions"} <= samples

    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["net"]["norm"] == "batch"
    # The scale factor is the std of the training offsets, computed independently here.
    dm = SketchDataModule(builtin="synthetic", classes=["circle", "house"], num_per_class=10, batch_size=4,
                          max_seq_len=40)
    dm.setup("fit")
    expected = scale_factor(dm.sets["train"].sketches)
    assert float(raw["state_dict"]["scale_factor"]) == np.float32(expected)

    model = zoo.load(ckpt)
    assert isinstance(model, SketchRNNTask) and not model.training
    assert float(model.scale_factor) == np.float32(expected)
    batch = next(iter(dm.val_dataloader()))
    cli.model.eval()
    torch.testing.assert_close(model(batch["strokes"], batch["lengths"])["out"],
                               cli.model(batch["strokes"], batch["lengths"])["out"])
    # Generation returns raw units: offsets scaled back by the stored factor.
    g = torch.Generator().manual_seed(0)
    model.scale_factor.fill_(1.0)
    unit = model.generate(3, generator=g, greedy=True)
    model.scale_factor.fill_(10.0)
    ten = model.generate(3, generator=torch.Generator().manual_seed(0), greedy=True)
    for a, b in zip(unit, ten):
        np.testing.assert_allclose(b[:, :2], 10 * a[:, :2], rtol=1e-5, atol=1e-5)

    out = tmp_path / "pred"
    ZooCLI(args=["predict", *tiny_sketch_args(tmp_path / "run"), f"--predict_out={out}", f"--ckpt_path={ckpt}"])
    for key in ("inputs", "reconstructions", "samples", "interpolation"):
        assert (out / f"batch000_{key}.svg").read_text().startswith("<svg")
        assert Image.open(out / f"batch000_{key}.png").size[0] > 0
    with np.load(out / "batch000_generated.npz") as f:  # numbers only: no allow_pickle
        gen = {key: np.split(f[key], np.cumsum(f[f"{key}_lengths"])[:-1]) for key in ("samples", "reconstructions")}
    assert len(gen["samples"]) == len(gen["reconstructions"]) == len(dm.sets["test"])
    # the samples the checkpoint's model draws for batch 0 (predict seeds each batch by its index)
    expected = zoo.load(ckpt).generate(len(dm.sets["test"]), generator=torch.Generator().manual_seed(0))
    assert [len(s) for s in gen["samples"]] == [len(s) for s in expected]
    for got, want in zip(gen["samples"], expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unconditional_fit(tmp_path):
    ZooCLI(args=["fit", *tiny_sketch_args(tmp_path, "--model.net.conditional=false", "--model.net.norm=layer",
                                          "--trainer.max_steps=2")])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and "val/L_R" in summary["metrics"] and "val/L_KL" not in summary["metrics"]


def test_resume_from_last_is_exact(tmp_path):
    # 16 training sketches, batch 8: 2 steps an epoch, with augmentation, recurrent dropout and z draws.
    # Two epochs straight through, and stopped after one then relaunched with --ckpt_path last, must end
    # with identical weights.
    common = ["--trainer.max_steps=-1", "--trainer.val_check_interval=null", "--trainer.max_epochs=2",
              "--trainer.limit_val_batches=1", "--data.batch_size=8", "--model.net.norm=layer"]
    straight = ZooCLI(args=["fit", *tiny_sketch_args(tmp_path / "straight", *common)])
    first, resumed = interrupted_then_resumed(tiny_sketch_args(tmp_path / "resumed", *common), tmp_path / "resumed")
    assert first["global_step"] == 2
    assert resumed.trainer.global_step == straight.trainer.global_step == 4
    assert_same_weights(straight.model, resumed.model)
