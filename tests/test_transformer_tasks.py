"""Transformer text data, tasks and the entry point end to end: tokenizers, built-in corpus and
seq2seq tasks, label smoothing, optimizer groups and the noam schedule, fit -> zoo.load -> predict."""
import csv
import io
import json
import math
import os
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.cli import ZooCLI
from zoo.data.seq2seq import Seq2SeqDataModule, cmudict_pairs, collate_pairs, make_pairs
from zoo.data.text import BOS, EOS, PAD, UNK, LMDataModule, Tokenizer, stdlib_corpus
from zoo.tasks.language import LanguageModel
from zoo.tasks.seq2seq import Seq2Seq
from tests.conftest import ROOT, cli_args

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------
# tokenizers

def test_char_tokenizer_specials_unknowns_and_plain_state():
    tok = Tokenizer("char").fit("abracadabra")
    assert tok.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"] and tok.itos[4:] == ["a", "b", "r", "c", "d"]
    ids = tok.encode("abz", bos=True, eos=True)
    assert ids == [BOS, 4, 5, UNK, EOS] and tok.unknown == 1
    assert tok.decode(ids) == "ab\ufffd"
    assert tok.decode([4, EOS, 5]) == "a" and tok.decode([PAD, BOS, 4], skip_specials=False) == "<pad><bos>a"
    state = json.loads(json.dumps(tok.state_dict()))  # plain data
    assert Tokenizer.from_state(state) == tok


def test_word_tokenizer_case_folding_stop_words_min_freq():
    text = "The cat sat on the mat. The CAT ran!"
    tok = Tokenizer("word", lowercase=True, stop_words="english").fit(text)
    assert tok.split(text) == ["cat", "sat", "mat", ".", "cat", "ran", "!"]
    assert tok.itos[4] == "cat"  # most frequent first
    assert tok.decode(tok.encode("A cat, the dog")) == "cat <unk> <unk>"
    assert Tokenizer("word", min_freq=2).fit(text).itos[4:] == ["The"]
    assert Tokenizer("word", stop_words=["sat", "mat"]).split("cat sat mat") == ["cat"]
    assert len(Tokenizer("char", max_size=2).fit("aaabbc")) == 6
    with pytest.raises(ValueError, match="word-level"):
        Tokenizer("char", stop_words="english")
    with pytest.raises(ValueError, match="level"):
        Tokenizer("byte")


def test_builtin_corpus_is_python_documentation_and_deterministic():
    text = stdlib_corpus()
    assert len(text) > 300_000 and 'The "assert" statement' in text
    assert stdlib_corpus() == text


def test_lm_datamodule_vocab_from_train_split_and_shifted_targets(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcabcabcabcabcabcabcabcabcabcabcabcabcabcabcab" + "xyz", encoding="utf-8")
    dm = LMDataModule(str(path), block_size=4, batch_size=2, val_fraction=0.2)
    with pytest.warns(UserWarning, match="mapped to <unk>"):
        dm.setup("fit")
    assert dm.tokenizer.itos[4:] == ["a", "b", "c"]  # 'x', 'y', 'z' only occur in the validation split
    item = dm.train_set[1]
    assert torch.equal(item["input"][1:], item["target"][:-1]) and len(item["input"]) == 4
    batch = next(iter(dm.val_dataloader()))
    assert batch["input"].shape == (2, 4)
    with pytest.raises(ValueError, match="UTF-8"):
        (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
        LMDataModule(str(tmp_path / "bad.txt")).load_text()


# ------------------------------------------------------------------------------------------------
# seq2seq data

def test_algorithmic_tasks_are_correct_seeded_and_held_out():
    for task in ("copy", "reverse", "sort", "addition"):
        train = make_pairs(task, 300, seed=1, max_length=4, num_symbols=5)
        for src, tgt in train:
            want = {"copy": src, "reverse": src[::-1], "sort": "".join(sorted(src)),
                    "addition": str(sum(map(int, src.split("+")))) if "+" in src else None}[task]
            assert tgt == want
        assert make_pairs(task, 300, seed=1, max_length=4, num_symbols=5) == train
        assert make_pairs(task, 300, seed=2, max_length=4, num_symbols=5) != train
    dm = Seq2SeqDataModule("addition", num_train=500, num_val=100, num_test=100, max_length=3)
    dm.setup("fit")
    train_src = {s for s, _ in dm.splits["train"]}
    assert not train_src & {s for s, _ in dm.splits["val"]} and not train_src & {s for s, _ in dm.splits["test"]}
    assert all(len(a) <= 3 for s, _ in dm.splits["train"] for a in s.split("+"))
    batch = collate_pairs([dm.datasets["train"][i] for i in range(3)])
    assert batch["tgt"][:, 0].eq(BOS).all() and (batch["tgt"] == EOS).sum() == 3
    with pytest.warns(UserWarning, match="distinct held-out pairs"):
        make_pairs("copy", 50, split="val", max_length=1, num_symbols=3)


def test_g2p_on_cmudict_splits_and_phoneme_error_rate():
    pairs = dict(cmudict_pairs())
    assert pairs["through"] == "TH R UW1" and "0" not in dict(cmudict_pairs(stress=False))["about"]
    dm = Seq2SeqDataModule("g2p", num_train=300, num_val=50, num_test=50)
    dm.setup("fit")
    words = [{w for w, _ in dm.splits[s]} for s in ("train", "val", "test")]
    assert not words[0] & words[1] and not words[0] & words[2] and len(words[0]) == 300
    assert dm.tgt_tokenizer.level == "word" and len(dm.tgt_tokenizer) > 30  # phonemes with stress digits
    # phoneme error rate = edit distance over phonemes / reference phonemes (hand-computed)
    from torchmetrics.text import WordErrorRate
    assert WordErrorRate()(["TH R OW1", "K AE1 T"], ["TH R UW1", "K AE1 T S"]).item() == pytest.approx(2 / 7)


# ------------------------------------------------------------------------------------------------
# tasks: loss, optimizer, schedule

def _with_net(model, tokenizers, steps=100):
    model._set_tokenizers(tokenizers)
    model._trainer = types.SimpleNamespace(estimated_stepping_batches=steps)
    return model


def test_label_smoothing_loss_over_real_tokens_only():
    tok = Tokenizer("char").fit("abcdef")
    m = _with_net(Seq2Seq(net={"d_model": 16, "n_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1,
                               "dropout": 0.0}, label_smoothing=0.1), {"src": tok, "tgt": tok})
    batch = {"src": torch.tensor([[4, 5, 6], [7, 0, 0]]), "tgt": torch.tensor([[1, 6, 5, 2], [1, 7, 2, 0]])}
    logp = F.log_softmax(m(batch["src"], batch["tgt"][:, :-1]), -1)
    target = batch["tgt"][:, 1:]
    real = target != PAD
    nll = -logp.gather(-1, target[..., None])[..., 0][real]
    smooth = -logp.mean(-1)[real]
    want = (0.9 * nll + 0.1 * smooth).mean()
    torch.testing.assert_close(m._loss(batch, 0.1), want)


def test_adamw_groups_and_noam_schedule():
    tok = Tokenizer("char").fit("abcdef")
    m = _with_net(LanguageModel(net={"d_model": 16, "n_heads": 2, "n_layers": 1, "norm": "rms"}, lr=1.0, scheduler="noam",
                                warmup_steps=4, weight_decay=0.1), {"text": tok})
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.98)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(m.net.embed.tok.weight) not in decayed and id(m.net.blocks[0].norm1.norm.weight) not in decayed
    assert id(m.net.blocks[0].ff.fc1.weight) in decayed
    for step in range(1, 9):  # paper Eq. 3, steps counted from 1
        want = 16 ** -0.5 * min(step ** -0.5, step * 4 ** -1.5)
        assert opt.param_groups[0]["lr"] == pytest.approx(want)
        opt.step()
        sched.step()


def test_cosine_schedule_with_warm_up():
    tok = Tokenizer("char").fit("abcdef")
    m = _with_net(LanguageModel(net={"d_model": 16, "n_heads": 2, "n_layers": 1}, lr=1e-3, scheduler="cosine", warmup_steps=2,
                                min_lr_ratio=0.1), {"text": tok}, steps=10)
    cfg = m.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    # linear warm-up over 2 steps, then cosine from 1e-3 down to 0.1 * 1e-3 at step 10
    want = [5e-4, 1e-3] + [1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * (s - 2) / 8)) for s in range(2, 11)]
    assert lrs == pytest.approx(want)


def test_bad_task_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="scheduler"):
        LanguageModel(scheduler="linear")
    with pytest.raises(ValueError, match="leak of the future"):
        LanguageModel(net={"norm": "group"})
    with pytest.raises(ValueError, match="task"):
        Seq2SeqDataModule("translate")


# ------------------------------------------------------------------------------------------------
# end to end through the CLI

def lm_args(root, *extra):
    return cli_args("transformer_lm", root, "--trainer.limit_val_batches=2", "--model.net.d_model=16",
                    "--model.net.n_heads=2", "--model.net.n_layers=1", "--model.block_size=16", "--model.warmup_steps=2",
                    "--model.sample_tokens=8", "--data.block_size=16", "--data.max_chars=20000", *extra)


def test_continuation_longer_than_the_context_keeps_the_prompt_and_slides():
    """Greedy continue_text against an obvious loop: each new token is the argmax of the network over
    the last block_size tokens, starting from the whole prompt (it used to keep 1 prompt token when
    max_new_tokens >= block_size)."""
    torch.manual_seed(1)
    model = LanguageModel(net={"d_model": 16, "n_heads": 2, "n_layers": 1}, block_size=8)
    model._set_tokenizers({"text": Tokenizer("char").fit("abcdefgh ")})
    model.eval()
    with torch.no_grad():  # large random weights: the argmax depends on the context (an untrained net's hardly does)
        for p in model.net.parameters():
            p.normal_()

    def reference(ids: list[int], max_new: int) -> str:
        with torch.no_grad():
            for _ in range(max_new):
                ids = ids + [int(model.net(torch.tensor([ids[-8:]]))[0, -1].argmax())]
        return model.tokenizer.decode(ids[-max_new:])

    prompt = model.tokenizer.encode("abcdef")
    assert reference(prompt, 12) != reference(prompt[-1:], 12)  # so a cut prompt would show
    for max_new in (2, 5, 12):  # within the context (cached), past it, longer than it
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing cut: the prompt fits the context
            assert model.continue_text("abcdef", max_new_tokens=max_new, greedy=True) == reference(prompt, max_new)
    with pytest.warns(UserWarning, match="prompt of 10 tokens cut to its last 8, the model's context"):
        model.continue_text("abcdefghab", max_new_tokens=3, greedy=True)
    with pytest.raises(TypeError, match="^continue_text takes one prompt, a str, got list$"):
        model.continue_text(["abc"])


def test_word_level_continuation_starts_after_a_space():
    torch.manual_seed(0)
    model = LanguageModel(net={"d_model": 16, "n_heads": 2, "n_layers": 1}, block_size=8).eval()
    model._set_tokenizers({"text": Tokenizer("word").fit("the cat sat on the mat")})
    prompt = "the cat"
    with torch.no_grad():
        ids = model.net.generate(torch.tensor([model.tokenizer.encode(prompt)]), 3, greedy=True)
    words = model.tokenizer.decode(ids[0, 2:])  # "sat on mat"-like: words joined by spaces
    assert words and model.continue_text(prompt, max_new_tokens=3, greedy=True) == " " + words  # not "the catsat"


def test_transform_takes_a_list_of_inputs():
    model = Seq2Seq(net={"d_model": 16, "n_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "max_len": 16})
    tok = Tokenizer("char").fit("abc")
    model._set_tokenizers({"src": tok, "tgt": tok})
    assert model.transform([]) == []
    with pytest.raises(TypeError, match=r"^transform takes a list of inputs, got the str 'abc'; pass \['abc'\]$"):
        model.transform("abc")  # would be three inputs, one per character


def test_lm_fit_load_and_predict(tmp_path, monkeypatch):
    sample_steps = []
    import zoo.tasks.language as language

    log_text = language.log_text
    monkeypatch.setattr(language, "log_text",
                        lambda module, *a: sample_steps.append(module.global_step) or log_text(module, *a))
    cli = ZooCLI(args=["fit", *lm_args(tmp_path / "run", "--model.net.norm=batch")])
    assert sample_steps == [2, 4]  # samples at every validation (not the sanity check)
    assert cli.trainer.gradient_clip_val == 1.0  # the config clips gradients
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    raw = torch.load(ckpt, weights_only=True)
    assert raw["hyper_parameters"]["net"]["norm"] == "batch" and raw["tokenizers"]["text"]["level"] == "char"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and {"val/loss", "val/ppl", "val/bpc"} <= set(summary["metrics"])
    m = summary["metrics"]
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]), rel=1e-4)
    assert m["val/bpc"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-4)  # char level
    assert "continuation:" in next((tmp_path / "run" / "samples").glob("*.txt")).read_text()

    model = zoo.load(ckpt)
    assert isinstance(model, LanguageModel) and model.tokenizer == cli.datamodule.tokenizer
    ids = torch.randint(4, len(model.tokenizer), (2, 16))
    cli.model.eval()
    torch.testing.assert_close(model(ids), cli.model(ids))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = model.continue_text("\u2603 def", max_new_tokens=5, greedy=True)
    assert len(text) == 5 and any("<unk>" in str(w.message) for w in caught)  # unseen char: handled

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\n\nreturn\n", encoding="utf-8")
    out = tmp_path / "pred"
    ZooCLI(args=["predict", *lm_args(tmp_path / "run"), f"--data.predict_path={prompts}", "--data.max_new_tokens=6",
                 "--data.greedy=true", f"--predict_out={out}", f"--ckpt_path={ckpt}"])
    written = (out / "continuations.txt").read_text(encoding="utf-8")
    assert written.count("=== prompt:") == 2
    for p in ("def f(x):", "return"):  # the datamodule's generation settings reached the task
        assert f"=== prompt: {p}\n{p}{model.continue_text(p, max_new_tokens=6, greedy=True)}\n" in written


def s2s_args(root, *extra):
    return cli_args("transformer_seq2seq", root, "--model.net.d_model=16", "--model.net.n_heads=2",
                    "--model.net.num_encoder_layers=1", "--model.net.num_decoder_layers=1", "--model.net.d_ff=32",
                    "--model.warmup_steps=2", "--data.num_train=64", "--data.num_val=16", "--data.num_test=16",
                    "--data.batch_size=16", *extra)


def test_seq2seq_fit_load_test_and_predict(tmp_path, monkeypatch):
    ZooCLI(args=["fit", *s2s_args(tmp_path / "run", "--model.net.norm_position=pre")])
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "ok" and "val/exact_match" in summary["metrics"]
    assert "target:" in next((tmp_path / "run" / "samples").glob("*.txt")).read_text()
    model = zoo.load(ckpt)
    assert isinstance(model, Seq2Seq) and model.net.head.weight is model.net.src_embed.tok.weight
    outs = model.transform(["abc", "jjj"], beam_size=2)
    assert len(outs) == 2 and all(isinstance(o, str) for o in outs)
    with pytest.warns(UserWarning, match="2 input token"):  # unseen characters: <unk>, not a crash
        assert len(model.transform(["a\u2603z", "b"])) == 2

    with pytest.raises(ValueError, match=r"^input 'a{40}'\.\.\. has 70 tokens, more than the model's max_len=64$"):
        model.transform(["ab", "a" * 70])
    (tmp_path / "long.txt").write_text("a" * 70 + "\n")
    # from the command line, with the progress bar drawing on stdout: in a log of both, the error line
    # is a line of its own (the bar is ended first)
    log = subprocess.run([sys.executable, str(ROOT / "train.py"), "predict", *s2s_args(tmp_path / "run"),
                          "--trainer.enable_progress_bar=true", f"--data.predict_path={tmp_path / 'long.txt'}",
                          f"--predict_out={tmp_path / 'long'}", f"--ckpt_path={ckpt}"], cwd=ROOT, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled"})
    assert log.returncode == 2 and "Predicting" in log.stdout
    assert f"error: input '{'a' * 40}'... has 70 tokens, more than the model's max_len=64" in log.stdout.splitlines()
    inputs = tmp_path / "in.txt"
    inputs.write_text('abcd\nba\na\tb"c\n')
    out = tmp_path / "pred"
    ZooCLI(args=["predict", *s2s_args(tmp_path / "run"), f"--data.predict_path={inputs}", f"--predict_out={out}",
                 f"--ckpt_path={ckpt}"])
    with open(out / "predictions.tsv", newline="") as f:  # a tab or quote in an input is quoted: two fields a row
        rows = list(csv.reader(f, dialect="excel-tab"))
    assert rows == [[i, o] for i, o in zip(["abcd", "ba", 'a\tb"c'], model.transform(["abcd", "ba", 'a\tb"c']))]
    lines = (out / "predictions.tsv").read_text().splitlines()
    monkeypatch.setattr("sys.stdin", io.StringIO("abcd\ncab\n"))  # the same from stdin, into the same folder:
    ZooCLI(args=["predict", *s2s_args(tmp_path / "run"), "--data.predict_path=-", f"--predict_out={out}",
                 f"--ckpt_path={ckpt}"])
    stdin_lines = (out / "predictions.tsv").read_text().splitlines()  # this run's predictions only
    assert [ln.split("\t")[0] for ln in stdin_lines] == ["abcd", "cab"] and stdin_lines[0] == lines[0]


def test_g2p_fit_logs_word_and_phoneme_error_rates(tmp_path):
    ZooCLI(args=["fit", *s2s_args(tmp_path, "--data.task=g2p", "--trainer.max_steps=2")])
    metrics = json.loads((tmp_path / "summary.json").read_text())["metrics"]
    assert 0 <= metrics["val/per"] and metrics["val/wer"] == pytest.approx(1 - metrics["val/exact_match"])
