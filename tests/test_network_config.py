"""Network configs (`zoo.models.config`): one frozen dataclass per network, made from its signature,
that tasks take whole, checkpoints store as a plain dict and the CLI sets as `--model.net.*`."""
import dataclasses
import inspect

import pytest
import torch
from torch import nn

import zoo
from tests.conftest import tiny_unet_args
from zoo.cli import ZooCLI

from zoo.models.config import flat, network_config
from zoo.models.sketch_rnn import SketchRNN, SketchRNNConfig
from zoo.models.transformer import Transformer, TransformerConfig, TransformerLM, TransformerLMConfig
from zoo.models.unet import UNet, UNetConfig
from zoo.norm import build_norm
from zoo.tasks.language import LanguageModel
from zoo.tasks.segmentation import UNetSegmentation
from zoo.tasks.seq2seq import Seq2Seq
from zoo.tasks.sketch import SketchRNNTask

CONFIGS = [(UNetConfig, UNet, {"in_channels", "num_classes"}),
           (TransformerLMConfig, TransformerLM, {"vocab_size", "max_len"}),
           (TransformerConfig, Transformer, {"src_vocab_size", "tgt_vocab_size", "pad_id"}),
           (SketchRNNConfig, SketchRNN, {"max_seq_len"})]


@pytest.mark.parametrize("config, network, given", CONFIGS, ids=lambda x: getattr(x, "__name__", ""))
def test_fields_are_the_networks_arguments_less_what_the_data_gives(config, network, given):
    params = inspect.signature(network).parameters
    assert {f.name: f.default for f in dataclasses.fields(config)} == {
        name: p.default for name, p in params.items() if name not in given}
    assert set(config.given) == given and config.network is network
    with pytest.raises(dataclasses.FrozenInstanceError):
        config().norm = "rms"


class Spy(nn.Module):
    """Records what it was built with."""

    def __init__(self, vocab_size: int, flag_a: bool = False, flag_b: bool = True, width: int = 4):
        super().__init__()
        self.kwargs = dict(vocab_size=vocab_size, flag_a=flag_a, flag_b=flag_b, width=width)


def test_build_passes_every_field_by_name_and_exactly_the_given_values():
    SpyConfig = network_config(Spy, given=("vocab_size",))
    cfg = SpyConfig(flag_a=True, flag_b=False, width=7)
    assert cfg.build(vocab_size=11).kwargs == {"vocab_size": 11, "flag_a": True, "flag_b": False, "width": 7}
    with pytest.raises(TypeError, match=r"needs \['vocab_size'\], got \[\]"):
        cfg.build()
    with pytest.raises(TypeError, match=r"got \['vocab_size', 'width'\]"):
        cfg.build(vocab_size=3, width=2)  # a field is never overridden behind the config's back
    with pytest.raises(TypeError, match="no default"):
        network_config(Spy)


class Loose(nn.Module):
    def __init__(self, width=4, widths: list = [4, 8], *layers, **extra):  # noqa: B006
        super().__init__()


def test_a_network_the_config_cannot_describe_is_refused_naming_each_argument():
    with pytest.raises(TypeError) as info:
        network_config(Loose)
    assert str(info.value) == ("network_config(Loose): its arguments must be named, annotated and have immutable "
                               "defaults: *layers, **extra, width (no type annotation), widths (a mutable default "
                               "[4, 8]; give a tuple)")


def test_of_takes_a_config_a_dict_or_none_and_names_unknown_fields():
    cfg = UNetConfig(depth=3)
    assert UNetConfig.of(cfg) is cfg and UNetConfig.of(None) == UNetConfig()
    assert UNetConfig.of({"depth": 3, "norm": "group"}) == UNetConfig(depth=3, norm="group")
    with pytest.raises(ValueError, match=r"UNetConfig has no field\(s\) \['dept'\]; its fields: base_channels, depth"):
        UNetConfig.of({"dept": 3})
    with pytest.raises(TypeError, match="UNetConfig or a dict"):
        UNetConfig.of("depth=3")


@pytest.mark.parametrize("make, check", [
    (lambda: UNetSegmentation(net={"base_channels": 4, "depth": 3, "norm": "group"}, num_classes=3),
     lambda t: (t.net.depth, t.net.head.out_channels, type(t.net.encoder[0].norm1)) == (3, 3, type(build_norm("group", 4)))),
    (lambda: SketchRNNTask(net={"enc_rnn_size": 4, "dec_rnn_size": 6, "z_size": 2, "num_mixture": 1,
                                "conditional": False}, max_seq_len=20),
     lambda t: (t.net.conditional, t.net.decoder.hidden_size, t.net.max_seq_len) == (False, 6, 20)),
], ids=["unet", "sketch"])
def test_tasks_store_the_config_as_plain_data_and_rebuild_from_it(make, check):
    task = make()
    assert check(task)
    hp = dict(task.hparams)
    assert isinstance(hp["net"], dict) and all(isinstance(v, (str, int, float, bool, type(None)))
                                                for v in flat(hp).values())
    again = type(task)(**hp)  # as Lightning rebuilds a task from a checkpoint's hyper-parameters
    again.load_state_dict(task.state_dict())
    assert check(again) and again.hparams == task.hparams


def test_transformer_tasks_check_their_config_before_any_data_is_read():
    with pytest.raises(ValueError, match="norm_position"):
        LanguageModel(net={"norm_position": "middle"})
    with pytest.raises(ValueError, match="TransformerLMConfig has no field"):
        LanguageModel(net={"n_layer": 2})  # the typo is named, not ignored
    task = Seq2Seq(net={"d_model": 8, "n_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1})
    assert task.net is None and task.net_config.d_model == 8 and task.hparams.net["d_model"] == 8


def test_d_ff_defaults_to_four_times_d_model():
    lm = TransformerLM(vocab_size=5, d_model=8, n_heads=2, n_layers=1)
    assert lm.blocks[0].ff.fc1.out_features == 32
    s2s = Transformer(5, 5, d_model=8, n_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    assert s2s.encoder[0].ff.fc1.out_features == s2s.decoder[0].ff.fc1.out_features == 32


def test_flat_gives_dotted_plain_values_from_any_nested_form():
    from jsonargparse import Namespace

    want = {"net.norm": "batch", "net.depth": 3, "net.attn.qk_norm": True, "betas": [0.9, 0.98], "lr": 0.1}
    assert flat({"net": {"norm": "batch", "depth": 3, "attn": {"qk_norm": True}}, "betas": (0.9, 0.98), "lr": 0.1}) == want
    assert flat(Namespace(net=Namespace(norm="batch", depth=3, attn={"qk_norm": True}), betas=[0.9, 0.98], lr=0.1)) == want
    assert flat({"net": UNetConfig(norm="batch")})["net.norm"] == "batch"


def test_checkpoints_with_the_network_arguments_at_the_top_level_still_load(tmp_path, capsys):
    """Checkpoints written before tasks took `net` (flat network arguments) load, predict and resume."""
    root = tmp_path / "run"
    ZooCLI(args=["fit", *tiny_unet_args(root, "--trainer.max_steps=2", "--model.net.norm=group")])
    ckpt = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)
    hp = ckpt["hyper_parameters"]
    hp.update(hp.pop("net"))  # as it was written then
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    new, loaded = zoo.load(root / "checkpoints" / "last.ckpt"), zoo.load(old)
    assert loaded.hparams == new.hparams and loaded.hparams.net["norm"] == "group"
    x = torch.rand(1, 1, 68, 68) * 255
    torch.testing.assert_close(loaded(x), new(x), rtol=0, atol=0)
    # predict takes the checkpoint's arguments over the config's (norm none there)
    cli = ZooCLI(args=["predict", *tiny_unet_args(tmp_path / "p"), f"--ckpt_path={old}",
                       f"--predict_out={tmp_path / 'pred'}"])
    assert cli.model.hparams.net["norm"] == "group" and list((tmp_path / "pred").glob("*_probs.npy"))
    assert "net.norm: checkpoint 'group', now 'none'" in capsys.readouterr().err
