"""Bad input through `train.py` ends in one line, `error: <what is wrong>`, and a non-zero exit; the
traceback only with ZOO_DEBUG=1. Checkpoints given to fit/predict get `zoo.load`'s checks."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import ROOT, cli_args, tiny_unet_args
from zoo.cli import ZooCLI, main
from zoo.data.text import read_lines
from zoo.tasks.segmentation import UNetSegmentation


def run_main(capsys, *argv) -> tuple[int, str]:
    """`train.py ARGV` in-process: (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture(scope="module")
def unet_ckpt(tmp_path_factory):
    """A real checkpoint of a tiny U-Net run trained with norm=none (the config's default)."""
    root = tmp_path_factory.mktemp("unet")
    ZooCLI(args=["fit", *tiny_unet_args(root, "--trainer.max_steps=2")])
    return root / "checkpoints" / "last.ckpt"


@pytest.mark.slow
def test_bad_norm_is_one_line_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "fit", *tiny_unet_args(tmp_path, "--model.net.norm=bogus")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines[-1] == ("error: unknown norm kind 'bogus'; valid kinds: batch, layer, instance, group, rms, none (yours: "
                         "register it with zoo.norm.register_norm, in a module that train.py imports with --import MODULE)")
    assert len(lines) <= 2 and "Traceback" not in proc.stderr  # at most Lightning's "Seed set to 0" before it
    debug = subprocess.run([sys.executable, "train.py", "fit", *tiny_unet_args(tmp_path, "--model.net.norm=bogus")],
                           cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "WANDB_MODE": "disabled", "ZOO_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "unknown norm kind 'bogus'" in debug.stderr


def test_an_option_the_subcommand_does_not_read_is_refused(tmp_path, capsys, unet_ckpt):
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, f"--predict_out={tmp_path / 'p'}"))
    assert code == 2 and error_lines(err) == ["error: --predict_out is read by predict, not fit"]
    code, err = run_main(capsys, "predict", *tiny_unet_args(tmp_path), f"--ckpt_path={unet_ckpt}", "--wandb.project=x")
    assert code == 2 and error_lines(err) == [
        "error: --wandb.project: predict does not log to wandb (it writes files to --predict_out)"]
    assert not (tmp_path / "p").exists() and not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model.nrm=3"], "Option 'nrm' is not accepted"),
    (["--trainer.max_steps=abc"], "error: --trainer.max_steps: Expected a <class 'int'>. Got value: abc"),
    (["--data.crop_size=-3"], "error: crop_size=-3 must be >= 1"),
    (["--trainer.val_check_interval=0"], "error: trainer.val_check_interval=0: give a number of training batches"),
    (["--model.optimizer=torch.optim.Nope"], "error: --model.optimizer: Type typing.Callable"),
    (["--model.optimizer=torch.optim.Nope"], "module 'torch.optim' has no attribute 'Nope'. Got value: torch.optim.Nope"),
])
def test_bad_arguments_name_the_value(tmp_path, capsys, extra, message):
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, *extra))
    assert code == 2 and len(error_lines(err)) == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("typo, hint", [
    ("--model.net.nrom=group", "unrecognized arguments: --net.nrom=group; did you mean --model.net.norm?"),
    ("--data.batchsize=3", "Option 'batchsize' is not accepted; did you mean --data.batch_size?"),
    ("--trainer.max_stesp=3", "unrecognized arguments: --trainer.max_stesp=3; did you mean --trainer.max_steps?"),
    ("--trainr.max_steps=3", "; did you mean --trainer.max_steps?"),
    ("--trainer.max_step=3", "unrecognized arguments: --trainer.max_step=3; did you mean --trainer.max_steps?"),
    ("--model.optimizer.llr=0.1", "Option 'llr' is not accepted. Got value: Namespace(class_path='torch.optim.SGD', "
                                  "init_args=Namespace(llr='0.1')); did you mean --model.optimizer.lr?"),
])
def test_a_mistyped_option_gets_the_closest_name(tmp_path, capsys, typo, hint):
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, "--model.optimizer=SGD", typo))
    assert code == 2 and len(error_lines(err)) == 1 and error_lines(err)[0].endswith(hint)


def test_an_unknown_option_far_from_any_gets_no_guess(tmp_path, capsys):
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, "--trainer.xyzzy=3"))
    assert code == 2 and error_lines(err) == ["error: unrecognized arguments: --trainer.xyzzy=3"]


def test_images_with_other_channels_than_the_model_name_the_argument(tmp_path, capsys):
    from tests.test_segmentation_data import make_root

    root = make_root(tmp_path / "rgb", rgb=True)  # RGB images for a U-Net left at in_channels=1
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, f"--data.root={root}", "--data.crop_size=12"))
    assert code == 2 and error_lines(err) == [
        "error: the training images have 3 channel(s), the model takes 1; set --model.in_channels 3"]


def test_language_model_data_errors_name_value_split_and_file(tmp_path, capsys):
    code, err = run_main(capsys, "fit", *cli_args("transformer_lm", tmp_path, "--data.batch_size=-1"))
    assert code == 2 and error_lines(err) == ["error: batch_size=-1 must be >= 1"]
    text = tmp_path / "tiny.txt"
    text.write_text("abcdefghij" * 40)  # 400 characters: a 40-character validation split
    code, err = run_main(capsys, "fit", *cli_args("transformer_lm", tmp_path, f"--data.path={text}",
                                                  "--model.block_size=64", "--data.block_size=64"))
    assert code == 2 and error_lines(err) == [
        f"error: the validation split (last val_fraction=0.1) of {text} has 40 tokens, "
        "fewer than block_size + 1 = 65"]


def test_predict_and_test_refuse_untrained_weights(tmp_path, capsys):
    for stage in ("predict", "test"):
        code, err = run_main(capsys, stage, *tiny_unet_args(tmp_path))
        assert code == 2 and error_lines(err) == [
            f"error: {stage} needs --ckpt_path: a checkpoint written by `train.py fit` (or `last`: "
            f"{tmp_path / 'checkpoints' / 'last.ckpt'}); without one the model would have untrained weights"]


def test_subcommands_stages_and_outputs_a_run_cannot_take_are_one_line(tmp_path, capsys, unet_ckpt, monkeypatch):
    choices = "give one of fit, validate, test, predict, compare, export (train.py --help, train.py compare --help)"
    assert run_main(capsys) == (2, f"error: no subcommand; {choices}\n")
    assert run_main(capsys, "fitt", "--config", "unet") == (2, f"error: unknown subcommand 'fitt'; {choices}\n")
    code, err = run_main(capsys, "predict", f"--ckpt_path={unet_ckpt}")
    assert code == 2 and error_lines(err) == ["error: train.py predict needs --config: a config file, or a bundled one "
                                              "by name (mambavision, resnet, sketch_rnn, transformer_lm, "
                                              "transformer_seq2seq, unet, unet_paper)"]
    assert run_main(capsys, "export", "--ckpt_path", str(unet_ckpt)) == (
        2, "error: train.py export: the following arguments are required: --out (--help lists the arguments)\n")
    monkeypatch.delattr(UNetSegmentation, "test_step")  # a task without a test stage, as the LM
    code, err = run_main(capsys, "test", *tiny_unet_args(tmp_path), f"--ckpt_path={unet_ckpt}")
    assert code == 2 and error_lines(err) == ["error: No `test_step()` method defined to run `Trainer.test`."]
    afile = tmp_path / "afile"
    afile.write_text("")
    code, err = run_main(capsys, "predict", *tiny_unet_args(tmp_path), f"--ckpt_path={unet_ckpt}", f"--predict_out={afile}")
    assert code == 2 and error_lines(err) == [f"error: --predict_out {str(afile)!r} is a file; give a folder (created if "
                                              "missing)"]
    with pytest.raises(FileNotFoundError, match=r"^--data.predict_path '.*nothere.txt': no such file \(a text file"):
        read_lines(str(tmp_path / "nothere.txt"))  # the prompts / inputs of the LM and seq2seq predict


def test_foreign_truncated_and_code_checkpoints_are_refused_naming_the_file(tmp_path, capsys, unet_ckpt):
    ckpt = torch.load(unet_ckpt, weights_only=True)
    lm = tmp_path / "lm.ckpt"
    torch.save({**ckpt, "zoo": {**ckpt["zoo"], "task": "zoo.tasks.language.LanguageModel"}}, lm)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(unet_ckpt.read_bytes()[:5000])
    plain = tmp_path / "plain.ckpt"
    torch.save({"weights": torch.zeros(2)}, plain)
    untagged = tmp_path / "untagged.ckpt"  # a task whose on_save_checkpoint left out ZooModule's
    torch.save({k: v for k, v in ckpt.items() if k != "zoo"}, untagged)
    marker = tmp_path / "ran"

    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({**ckpt, "payload": Payload()}, evil, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    cases = {lm: "holds a zoo.tasks.language.LanguageModel model, but the config builds "
                 "zoo.tasks.segmentation.UNetSegmentation",
             truncated: "is truncated or corrupt",
             plain: "is not a zoo checkpoint: it lacks the 'zoo' and 'state_dict' entries that zoo's trainer writes "
                    "(found 'weights')",
             untagged: "is not a zoo checkpoint: it lacks the 'zoo' entry that zoo's trainer writes (a task that "
                       "overrides on_save_checkpoint must call super().on_save_checkpoint(checkpoint), which writes",
             evil: "is refused: it is not plain data"}
    for path, message in cases.items():
        for stage in ("predict", "fit"):
            code, err = run_main(capsys, stage, *tiny_unet_args(tmp_path / "run"), f"--ckpt_path={path}")
            (line,) = error_lines(err)
            assert code == 2 and str(path) in line and message in line, line
    assert not marker.exists()


def test_a_bug_in_the_users_own_code_is_a_failure_naming_its_type(tmp_path, capsys, monkeypatch):
    """A KeyError in a task's training_step is not bad input: exit 1, its type and the debug switch
    named, as any failure while running; the same type raised by zoo about its input stays exit 2."""
    (tmp_path / "buggy_task.py").write_text(
        "from zoo.tasks.segmentation import UNetSegmentation\n\n\n"
        "class Buggy(UNetSegmentation):\n"
        "    def training_step(self, batch, batch_idx):\n"
        "        return batch['imgs']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_main(capsys, "fit", "--import", "buggy_task", *tiny_unet_args(tmp_path / "run"),
                         "--model.class_path=buggy_task.Buggy")
    assert code == 1 and error_lines(err) == ["error: KeyError: missing key 'imgs' (ZOO_DEBUG=1 shows the traceback)"]
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path / "run2", "--data.crop_size=-1"))
    assert code == 2 and "KeyError" not in err and error_lines(err)[0].startswith("error: ")
    code, err = run_main(capsys, "fit", "--import", "no_such_module_here", *tiny_unet_args(tmp_path / "run3"))
    assert code == 2 and error_lines(err) == [
        "error: --import no_such_module_here: cannot import it (No module named 'no_such_module_here'); give a "
        "module on the Python path"]


def test_a_model_argument_that_is_an_object_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """A checkpoint would hold it as the CLI's class_path dict (or an object weights_only refuses), and
    zoo.load would hand the task that dict: refused when the task saves its hyper-parameters."""
    (tmp_path / "with_criterion.py").write_text(
        "from torch import nn\n\nfrom zoo.tasks.segmentation import UNetSegmentation\n\n\n"
        "class WithCriterion(UNetSegmentation):\n"
        "    def __init__(self, criterion: nn.Module = nn.CrossEntropyLoss(), **kwargs):\n"
        "        super().__init__(**kwargs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, err = run_main(capsys, "fit", "--import", "with_criterion", *tiny_unet_args(tmp_path / "run"),
                         "--model.class_path=with_criterion.WithCriterion", "--model.criterion=torch.nn.MSELoss")
    assert code == 2 and error_lines(err) == [
        "error: model argument criterion is an object (torch.nn.MSELoss): hyper-parameters must be plain "
        "data (numbers, strings, lists, dicts), which checkpoints load without running code; take a name or its "
        "settings and build the object in the task"]
    assert not (tmp_path / "run").exists()
    from with_criterion import WithCriterion

    with pytest.raises(TypeError, match=r"^model argument criterion is an object \(CrossEntropyLoss\)"):
        WithCriterion(net={"base_channels": 4, "depth": 2})


def test_resume_with_other_model_arguments_is_refused(tmp_path, capsys, unet_ckpt):
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, "--model.net.norm=batch"), f"--ckpt_path={unet_ckpt}")
    assert code == 2 and error_lines(err) == [
        f"error: cannot resume {unet_ckpt} with other model arguments or settings (net.norm: checkpoint 'none', "
        "now 'batch'); resume with the checkpoint's, or start a new run in another --trainer.default_root_dir"]


def test_resume_with_another_seed_or_injected_optimizer_is_refused(tmp_path, capsys):
    # Lightning restores an injected optimizer's state (its lr included), and the seed draws the data
    # order and each step's randomness: a resume that changed them would record one run and train another
    sgd = ("--model.optimizer=SGD", "--model.optimizer.lr=0.01")
    ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=2", *sgd)])
    for changed, what in ((["--model.optimizer.lr=0.1"], "model.optimizer.init_args.lr: checkpoint 0.01, now 0.1"),
                          (["--seed_everything=1"], "seed_everything: checkpoint 0, now 1")):
        code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, *sgd, *changed), "--ckpt_path=last")
        assert code == 2 and error_lines(err)[0].endswith(f"with other model arguments or settings ({what}); resume "
                                                          "with the checkpoint's, or start a new run in another "
                                                          "--trainer.default_root_dir")
    assert ZooCLI(args=["fit", *tiny_unet_args(tmp_path, *sgd), "--ckpt_path=last"]).trainer.global_step == 4
    capsys.readouterr()


def test_resume_with_other_data_settings_warns_naming_them(tmp_path, capsys):
    # allowed, as in Lightning, but said: the resumed run trains on other batches; the arguments that
    # only say how batches are loaded or what predict reads are not worth a line
    ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=2")])
    capsys.readouterr()
    ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=3", f"--data.predict_dir={tmp_path}"),
                 "--ckpt_path=last"])
    assert "warning" not in capsys.readouterr().err
    cli = ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=4", "--data.batch_size=1",
                                              "--data.sigma=4.0"), "--ckpt_path=last"])
    assert ("warning: resuming with other data settings than the checkpoint's (data.batch_size: checkpoint "
            "2, now 1, data.sigma: checkpoint 5.0, now 4.0): the resumed run trains on other batches than "
            "the interrupted one would have") in capsys.readouterr().err
    assert cli.trainer.global_step == 4 and cli.datamodule.hparams.batch_size == 1
    # a checkpoint written before the data settings were recorded: nothing to compare them with
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    settings = ckpt["callbacks"]["ResumeSettings"]["settings"]
    ckpt["callbacks"]["ResumeSettings"]["settings"] = {k: v for k, v in settings.items() if not k.startswith("data.")}
    torch.save(ckpt, last)
    ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=5"), "--ckpt_path=last"])
    assert "warning" not in capsys.readouterr().err


def test_predict_uses_the_checkpoints_model_arguments_and_says_so(tmp_path, capsys, unet_ckpt):
    cli = ZooCLI(args=["predict", *tiny_unet_args(tmp_path, "--model.net.norm=batch", "--data.num_classes=3",
                                                  "--data.input_norm=robust"),
                       f"--ckpt_path={unet_ckpt}", f"--predict_out={tmp_path / 'pred'}"])
    err = capsys.readouterr().err
    assert ("using the checkpoint's model arguments (net.norm: checkpoint 'none', now 'batch', "
            "num_classes: checkpoint 2, now 3 (data.num_classes follows))") in err
    assert ("the model scales its inputs as trained, input_norm='zscore' fitted on its training split; "
            "--data.input_norm 'robust' is not used (fit reads it)") in err
    assert cli.model.input_scaler.kind == "zscore"
    # a value the model and the data share (LINKED) follows the checkpoint in both
    assert cli.model.hparams.num_classes == cli.datamodule.hparams.num_classes == 2
    assert [np.load(p).shape[0] for p in (tmp_path / "pred").glob("*_probs.npy")] == [2, 2]


def test_ckpt_path_last_without_a_checkpoint_starts_a_new_run(tmp_path, capsys):
    cli = ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=2"), "--ckpt_path=last"])
    assert f"no last.ckpt in {tmp_path / 'checkpoints'}: starting a new run" in capsys.readouterr().err
    assert cli.trainer.global_step == 2
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()}
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path, "--model.net.norm=batch"))  # a new run on top
    assert code == 2 and error_lines(err) == [
        f"error: {tmp_path} already holds a run ({tmp_path / 'checkpoints' / 'last.ckpt'}); resume it with "
        "--ckpt_path last, or start a new run in another --trainer.default_root_dir"]
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").iterdir()} == before


def test_ckpt_path_best_is_the_runs_best_checkpoint(tmp_path, capsys):
    ZooCLI(args=["fit", *tiny_unet_args(tmp_path, "--trainer.max_steps=2")])
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    by_name = ZooCLI(args=["validate", *tiny_unet_args(tmp_path), "--ckpt_path=best"])
    by_path = ZooCLI(args=["validate", *tiny_unet_args(tmp_path), f"--ckpt_path={best}"])
    assert by_name.trainer.ckpt_path == str(best)
    assert by_name.trainer.callback_metrics == by_path.trainer.callback_metrics
    code, err = run_main(capsys, "fit", *tiny_unet_args(tmp_path), "--ckpt_path=best")
    assert code == 2 and error_lines(err) == ["error: --ckpt_path best: fit resumes a run from last; give last, best "
                                              "(validate, test, predict) or a checkpoint's path"]
    code, err = run_main(capsys, "test", *tiny_unet_args(tmp_path / "empty"), "--ckpt_path=best")
    assert code == 2 and error_lines(err)[0].startswith("error: --ckpt_path best: 0 best-*.ckpt in ")
