"""The datamodule -> task contract (`zoo.data.contract`) and the values a model follows from its data
(`zoo.cli.link_data_to_model`)."""
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT, cli_args
from zoo.cli import ZooCLI
from zoo.data.contract import DataInfo, ZooDataModule
from zoo.data.images import ImagesDataModule
from zoo.data.segmentation import CellsDataModule
from zoo.data.seq2seq import Seq2SeqDataModule
from zoo.data.sketches import SketchDataModule
from zoo.data.text import LMDataModule


def test_each_datamodule_hands_what_it_declares(tmp_path):
    images = ImagesDataModule(num_classes=3, num_train=12, num_val=6, image_size=16, input_norm="zscore")
    images.setup("fit")
    info = images.info()
    assert info.classes == images.classes and len(info.classes) == 3
    assert info.scaler is images.scaler and info.scaler.kind == "zscore" and info.tokenizers is None

    cells = CellsDataModule(num_train=2, num_val=1, image_size=48, crop_size=20, context=0, input_norm="minmax")
    cells.setup("fit")
    assert cells.info().scaler is cells.scaler and cells.info().classes is None

    text = tmp_path / "t.txt"
    text.write_text("abcabcabd" * 20)
    lm = LMDataModule(str(text), block_size=4, batch_size=2, val_fraction=0.2, max_new_tokens=7, greedy=True)
    assert lm.info().chars_per_token is None  # before setup: nothing fitted yet
    lm.setup("fit")
    assert lm.info().tokenizers == {"text": lm.tokenizer} and lm.info().chars_per_token == 1.0  # characters
    assert lm.info().seq_len == 4 and (lm.info().max_new_tokens, lm.info().greedy) == (7, True)  # for predict

    s2s = Seq2SeqDataModule("addition", num_train=50, num_val=10, num_test=10, max_length=2)
    assert s2s.info().tokenizers is None
    s2s.setup("fit")
    assert s2s.info().tokenizers == {"src": s2s.src_tokenizer, "tgt": s2s.tgt_tokenizer}

    sketches = SketchDataModule(builtin="synthetic", classes=["circle", "house"], num_per_class=10, batch_size=4)
    assert sketches.info() == DataInfo()
    sketches.setup("fit")
    info = sketches.info()
    assert info.classes == ["circle", "house"] and info.seq_len == sketches.steps
    assert info.scale_factor == pytest.approx(float(sketches.scale_factor)) and info.scale_factor > 0


def test_a_plain_lightning_datamodule_hands_nothing():
    assert isinstance(ImagesDataModule(), ZooDataModule)
    assert ZooDataModule().info() == DataInfo()


def cli(config, root, *extra):
    return ZooCLI(args=cli_args(config, root, *extra), run=False)


def test_model_follows_its_data(tmp_path):
    c = cli("sketch_rnn", tmp_path, "--data.max_seq_len=120", "--model.net.enc_rnn_size=8", "--model.net.dec_rnn_size=8")
    assert c.model.hparams.max_seq_len == c.datamodule.hparams.max_seq_len == 120
    c = cli("transformer_lm", tmp_path, "--data.block_size=16")
    assert c.model.hparams.block_size == 16
    # a model value equal to the data's is fine
    c = cli("transformer_lm", tmp_path, "--data.block_size=16", "--model.block_size=16")
    assert c.model.hparams.block_size == 16


def test_print_config_shows_the_values_the_run_uses(tmp_path, capsys):
    """--print_config (whose output is a config to rerun) shows model values after they followed the data."""
    with pytest.raises(SystemExit) as done:
        ZooCLI(args=["fit", *cli_args("transformer_lm", tmp_path, "--data.block_size=16"), "--print_config"])
    assert done.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["block_size"] == printed["data"]["init_args"]["block_size"] == 16


def test_a_model_value_that_disagrees_with_the_data_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "fit", *cli_args("sketch_rnn", tmp_path, "--model.max_seq_len=100")],
                          cwd=ROOT, capture_output=True, text=True, env={"WANDB_MODE": "disabled", "PATH": "/usr/bin:/bin"})
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1] == ("error: model.max_seq_len=100 and data.max_seq_len=250 disagree; set data.max_seq_len only "
                         "(model.max_seq_len follows it)")


def test_task_reads_the_scaler_through_the_contract(tmp_path):
    c = cli("unet", tmp_path, "--model.net.base_channels=4", "--model.net.depth=3", "--data.crop_size=28",
            "--data.image_size=48", "--data.num_train=4", "--data.num_val=1", "--data.batch_size=2")
    c.trainer.fit(c.model, c.datamodule)
    fitted = c.datamodule.info().scaler
    assert torch.equal(c.model.input_scaler.shift, fitted.shift) and torch.equal(c.model.input_scaler.scale, fitted.scale)
    assert c.datamodule.training_context() == c.model.input_context == c.model.net.input_context > 0
