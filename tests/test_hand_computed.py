"""Numbers computed by hand (or by an obvious formula written here), fed through zoo's own code: the
U-Net loss and segmentation metrics, classification accuracy over an epoch, Sketch-RNN's KL floor and
weight schedule and its slerp, the GNMT length penalty and the beam search it steers, seq2seq exact
match and phoneme error rate. Each test names the wrong implementation it catches."""
import math

import pytest
import torch

from zoo.data.text import BOS, EOS, PAD, Tokenizer
from zoo.models.sketch_rnn import interpolate_latents, kl_weight_schedule
from zoo.models.transformer import Transformer, length_penalty
from zoo.tasks import sketch as sketch_task
from zoo.tasks.classification import ImageClassification
from zoo.tasks.segmentation import UNetSegmentation
from zoo.tasks.seq2seq import Seq2Seq
from zoo.tasks.sketch import SketchRNNTask


def capture_logs(module, monkeypatch) -> dict:
    """Replaces `module.log` by a recorder: name -> (value, keyword arguments)."""
    logged = {}
    monkeypatch.setattr(module, "log", lambda name, value, **kw: logged.__setitem__(name, (value, kw)))
    return logged


# ----------------------------------------------------------------------------------------- U-Net

def test_weighted_nll_hand_computed():
    # Eq. 1 with its minus sign, averaged over pixels: E = -(1/|pixels|) sum_x w(x) log p_l(x)(x).
    # 2 x 2 pixels; log-probabilities of the true class -1, -2, -0.5, -0.25, weights 1, 2, 4, 8:
    # sum w (-log p) = 1 + 4 + 2 + 2 = 9 over 4 pixels -> 2.25. Catches: a missing sign (-2.25), no
    # weights (3.75 / 4), a sum (9), normalising by the sum of the weights (9 / 15), or reading the
    # log-probability of the wrong class (the other class holds log(1 - p), not these values).
    true_lp = torch.tensor([[-1.0, -2.0], [-0.5, -0.25]])
    mask = torch.tensor([[0, 1], [1, 0]])
    other_lp = torch.log1p(-true_lp.exp())
    log_probs = torch.where(mask == 0, torch.stack([true_lp, other_lp]), torch.stack([other_lp, true_lp]))
    weight = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    loss = UNetSegmentation.weighted_nll(log_probs[None], mask[None], weight[None])
    assert loss.item() == pytest.approx(2.25)
    # a batch of two: the mean over all 8 pixels, (9 + 4 * 1 * 1) / 8 (second image: every pixel has
    # log p = -1, weight 1), not the mean of the two images' sums
    second = torch.full((2, 2, 2), -1.0)
    loss = UNetSegmentation.weighted_nll(torch.stack([log_probs, second]), torch.stack([mask, mask]),
                                         torch.stack([weight, torch.ones(2, 2)]))
    assert loss.item() == pytest.approx(13 / 8)


def test_segmentation_metrics_hand_computed(monkeypatch):
    # 3 classes on a 3 x 4 image, validated in two batches (row 0, then rows 1-2): the logged values
    # are over all pixels of the epoch.
    mask = torch.tensor([[0, 0, 0, 0],
                         [0, 1, 1, 2],
                         [0, 1, 2, 2]])
    pred = torch.tensor([[0, 0, 0, 1],
                         [0, 1, 2, 2],
                         [1, 1, 2, 2]])
    # by hand, per class (true count / predicted count / both):
    #   0: 6 / 4 / 4 -> IoU 4 / 6,  Dice 8 / 10
    #   1: 3 / 4 / 2 -> IoU 2 / 5,  Dice 4 / 7
    #   2: 3 / 4 / 3 -> IoU 3 / 4,  Dice 6 / 7
    # pixel accuracy 9 / 12 (the mean of the per-class recalls would be 7 / 9); the *_fg values average
    # classes 1 and 2 only (with class 0: IoU 0.606, Dice 0.743); per-batch averaging would differ too
    task = UNetSegmentation(num_classes=3, net={"base_channels": 4, "depth": 2})
    logged = capture_logs(task, monkeypatch)
    probs = torch.nn.functional.one_hot(pred, 3).permute(2, 0, 1).float() * 0.85 + 0.05  # argmax = pred
    for rows in (slice(0, 1), slice(1, 3)):
        monkeypatch.setattr(task, "predict_proba", lambda images, rows=rows: probs[None, :, rows])
        task._evaluate({"image": torch.zeros(1, 1, 3, 4)[..., rows, :], "mask": mask[None, rows],
                        "weight": torch.ones(1, 3, 4)[:, rows]}, task.val_metrics, "val")
        if rows.stop == 1:  # row 0: 3 right (p 0.9), 1 wrong (p 0.05), weight 1
            assert logged["val/loss"][0].item() == pytest.approx(-(3 * math.log(0.9) + math.log(0.05)) / 4)
    task.on_validation_epoch_end()
    got = {k: float(v) for k, (v, _) in logged.items()}
    want = {"val/iou_class0": 4 / 6, "val/iou_class1": 2 / 5, "val/iou_class2": 3 / 4,
            "val/iou_fg": (2 / 5 + 3 / 4) / 2, "val/dice_fg": (4 / 7 + 6 / 7) / 2, "val/pixel_acc": 9 / 12}
    assert {k: got[k] for k in want} == pytest.approx(want)


# ----------------------------------------------------------------------------------------- classification

def test_classification_accuracy_is_over_the_epoch_hand_computed(monkeypatch):
    # 3 classes, validated by a real Trainer in two batches of 3 and 1 images. Top-1 right: 2 of the
    # first batch, 0 of the second -> 2 / 4 (an unweighted mean of the batch accuracies would be 1 / 3).
    # Top-2 right: 3 and 0 -> 3 / 4 (unweighted 1 / 2). Then a second validation of the second batch
    # alone: 0 / 1 for both (without a reset between validations, 2 / 5 and 3 / 5). Catches a missing
    # reset (checked: it fails so), an unweighted batch mean and the last batch's value alone.
    from lightning import Trainer
    from torch.utils.data import DataLoader

    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [2.0, 1.0, 3.0], [3.0, 2.0, 1.0]])
    labels = torch.tensor([0, 2, 2, 2])  # right, second best, right, last
    model = ImageClassification(num_classes=3, top_k=2, sample_images=0, model_name="resnet10t",
                                model_kwargs=dict(stem_width=8, channels=[8, 8, 8, 8]))
    monkeypatch.setattr(model, "forward", lambda x: logits[x[:, 0, 0, 0].long()])  # image i -> row i
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 8, 8)
    batches = [{"image": images[:3], "label": labels[:3]}, {"image": images[3:], "label": labels[3:]}]
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    for data, want in ((batches, (2 / 4, 3 / 4)), (batches[1:], (0.0, 0.0))):
        metrics = trainer.validate(model, DataLoader(data, batch_size=None), verbose=False)[0]
        assert (metrics["val/top1"], metrics["val/top2"]) == pytest.approx(want)


# ----------------------------------------------------------------------------------------- Sketch-RNN

def test_kl_weight_schedule_hand_computed():
    # The paper: eta_step = 1 - (1 - eta_min) R^step, weight = w_KL * eta_step; magenta writes it as
    # kl_weight - (kl_weight - kl_weight_start) * R^step with kl_weight_start = w_KL * eta_min.
    # w_KL 0.5, eta_min 0.1 (start 0.05), R 0.5: step 0 -> 0.05; 1 -> 0.5 (1 - 0.9 / 2) = 0.275;
    # 2 -> 0.5 (1 - 0.9 / 4) = 0.3875; 3 -> 0.5 (1 - 0.9 / 8) = 0.44375. Catches a weight that decays
    # (kl_weight * R^step), that forgets the factor w_KL, or that is off by one step.
    for step, want in ((0, 0.05), (1, 0.275), (2, 0.3875), (3, 0.44375), (200, 0.5)):
        assert kl_weight_schedule(step, 0.5, 0.05, 0.5) == pytest.approx(want), step
    # magenta's defaults (0.5, 0.01, 0.99995) after 10k steps, in the paper's form (eta_min = 0.02)
    assert kl_weight_schedule(10_000) == pytest.approx(0.5 * (1 - 0.98 * 0.99995 ** 10_000))


@pytest.mark.parametrize("kl, floored", [(0.05, True), (0.8, False)])
def test_kl_tolerance_floor_in_the_training_loss(kl, floored, monkeypatch):
    # loss = L_R + weight * max(L_KL, kl_tolerance) (magenta: tf.maximum(kl_cost, kl_tolerance)); at
    # step 1 of the schedule above the weight is 0.275. L_R 1, tolerance 0.2:
    #   L_KL 0.05 -> 1 + 0.275 * 0.2 = 1.055, and no gradient reaches L_KL (the floor is a constant);
    #   L_KL 0.8  -> 1 + 0.275 * 0.8 = 1.22, gradient 0.275.
    # Catches a floor applied after weighting, L_KL + tolerance, a missing floor, or min for max.
    task = SketchRNNTask(net={"enc_rnn_size": 4, "dec_rnn_size": 4, "z_size": 2, "num_mixture": 1}, kl_weight=0.5,
                         kl_weight_start=0.05, kl_decay_rate=0.5, kl_tolerance=0.2)
    logged = capture_logs(task, monkeypatch)
    monkeypatch.setattr(SketchRNNTask, "global_step", property(lambda self: 1))
    l_kl = torch.tensor(kl, requires_grad=True)
    # the network's outputs and the two loss terms replaced by these numbers (L_s 0.75 + L_p 0.25 = L_R)
    outputs = {"out": None, "mu": None, "presig": None}
    monkeypatch.setattr(type(task.net), "forward", lambda self, strokes, lengths: outputs)
    monkeypatch.setattr(type(task.net), "params", lambda self, out: None)
    monkeypatch.setattr(sketch_task, "reconstruction_loss", lambda *a, **kw: (torch.tensor(0.75), torch.tensor(0.25)))
    monkeypatch.setattr(sketch_task, "kl_divergence", lambda mu, presig: l_kl)
    batch = {"strokes": torch.zeros(1, 4, 5), "lengths": torch.tensor([3])}
    loss = task.training_step(batch, 0)
    want = 1 + 0.275 * (0.2 if floored else kl)
    assert loss.item() == pytest.approx(want)
    assert logged["train/kl_weight"][0] == pytest.approx(0.275)
    assert logged["train/L_KL"][0].item() == pytest.approx(kl)  # logged before the floor
    (grad,) = torch.autograd.grad(loss, l_kl)
    assert grad.item() == pytest.approx(0.0 if floored else 0.275)
    # validation: the final weight 0.5 with the same floor
    task._evaluate(batch, "val")
    assert logged["val/loss"][0].item() == pytest.approx(1 + 0.5 * max(kl, 0.2))


def test_slerp_midpoints_hand_computed():
    # Orthogonal unit vectors: the slerp midpoint is (z0 + z1) / sqrt(2), of unit norm; linear
    # interpolation gives (z0 + z1) / 2, of norm 1 / sqrt(2), and fails here.
    z0, z1 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    path = interpolate_latents(z0, z1, 3)
    torch.testing.assert_close(path, torch.stack([z0, (z0 + z1) / math.sqrt(2), z1]))
    # 60 degrees apart in the plane: the points of 7 steps are at 0, 10, ..., 60 degrees on the unit
    # circle (the midpoint at 30: (sqrt(3) / 2, 1 / 2)); a lerp would cut the chord
    z1 = torch.tensor([0.5, math.sqrt(3) / 2])
    path = interpolate_latents(torch.tensor([1.0, 0.0]), z1, 7)
    angles = torch.deg2rad(torch.arange(0.0, 61.0, 10.0))
    torch.testing.assert_close(path, torch.stack([angles.cos(), angles.sin()], 1))
    torch.testing.assert_close(path[3], torch.tensor([math.sqrt(3) / 2, 0.5]))


# ----------------------------------------------------------------------------------------- Transformer

def test_length_penalty_hand_computed():
    # Wu et al. 2016: lp(Y) = (5 + |Y|)^alpha / (5 + 1)^alpha. (5 + 19) / 6 = 4 and (5 + 13) / 6 = 3:
    # alpha 0.5 -> 2, alpha 2 -> 9; |Y| = 1 -> 1 for any alpha; alpha 0 -> 1 for any length.
    # Catches (|Y| / 6)^alpha, (5 + |Y|)^alpha / 6 and a missing exponent.
    cases = [(19, 0.5, 2.0), (13, 2.0, 9.0), (1, 0.6, 1.0), (7, 0.0, 1.0), (4, 1.0, 1.5)]
    for length, alpha, want in cases:
        assert length_penalty(torch.tensor(length), alpha).item() == pytest.approx(want), (length, alpha)


PAD_, BOS_, EOS_, A_, B_ = PAD, BOS, EOS, 3, 4  # a 5-token target vocabulary


def fixed_next_token_model(p_after_bos: dict[int, float]) -> Transformer:
    """A Transformer whose decoder is replaced by a table: after <bos> the next-token probabilities
    `p_after_bos`, after any other token <eos> with probability 1. The search sees exactly these
    log-probabilities (log_softmax of log p is log p)."""
    model = Transformer(5, 5, d_model=8, n_heads=2, num_encoder_layers=1, num_decoder_layers=1, d_ff=8,
                        dropout=0.0, max_len=16, pad_id=PAD)
    table = torch.zeros(5, 5)
    table[:, EOS_] = 1.0
    table[BOS_] = 0.0
    for tok, p in p_after_bos.items():
        table[BOS_, tok] = p
    logits = table.log()

    def decode(tgt, memory, memory_pad, cache=None):
        return logits[tgt[:, -1]][:, None]

    model.decode = decode
    return model


@pytest.mark.parametrize("alpha, want", [(0.0, [EOS_, PAD_]), (0.6, [A_, EOS_])])
def test_beam_search_length_penalty_changes_the_winner(alpha, want):
    # Two finished hypotheses (lengths count <eos>, as tensor2tensor's (5 + i + 1) / 6):
    #   [eos]     log p = ln 0.5  = -0.6931, |Y| = 1, lp = 1
    #   [a, eos]  log p = ln 0.49 = -0.7133, |Y| = 2, lp = (7 / 6)^0.6 = 1.0969 -> -0.6503
    # Without the penalty (alpha 0) [eos] wins; at the paper's alpha 0.6 [a, eos] does. Catches a
    # penalty that is ignored, multiplied instead of divided (-0.7824), or applied to a different pair.
    model = fixed_next_token_model({EOS_: 0.5, A_: 0.49, B_: 0.01})
    out = model.beam_search(torch.tensor([[3, 4]]), BOS_, EOS_, max_len=5, beam_size=2, alpha=alpha)
    assert out.tolist() == [want]


def test_beam_search_length_counts_eos():
    # [eos] ln 0.5 = -0.6931 against [a, eos] ln 0.465 = -0.7657 at alpha 0.6:
    #   lengths with <eos> (1, 2):    -0.6931 / 1      vs -0.7657 / 1.0969 = -0.6981 -> [eos] wins;
    #   lengths without <eos> (0, 1): -0.6931 / 0.8963 = -0.7733 vs -0.7657 / 1 -> [a, eos] would win.
    model = fixed_next_token_model({EOS_: 0.5, A_: 0.465, B_: 0.035})
    out = model.beam_search(torch.tensor([[3, 4]]), BOS_, EOS_, max_len=5, beam_size=2, alpha=0.6)
    assert out.tolist() == [[EOS_, PAD_]]


# ----------------------------------------------------------------------------------------- seq2seq

PHONEMES = ["HH", "AH0", "L", "OW1", "W", "ER1", "D"]


def g2p_task(monkeypatch) -> tuple[Seq2Seq, Tokenizer, dict]:
    task = Seq2Seq(net={"d_model": 8, "n_heads": 2, "num_encoder_layers": 1, "num_decoder_layers": 1, "max_len": 16,
                        "share_embeddings": False}, num_samples=0)
    tgt = Tokenizer(level="word", tokens=PHONEMES)
    task._set_tokenizers({"src": Tokenizer(level="char", tokens=list("helowrd")), "tgt": tgt})
    monkeypatch.setattr(task, "_loss", lambda batch, smoothing: torch.tensor(0.0))
    return task, tgt, capture_logs(task, monkeypatch)


def test_exact_match_and_phoneme_error_rate_hand_computed(monkeypatch):
    # targets and greedy outputs, and the phoneme edits by hand:
    #   HH AH0 L OW1 -> HH AH0 L OW1   0 edits / 4  (pads after <eos> ignored)
    #   W ER1 L D    -> W AH0 D        2 (ER1 -> AH0, L deleted) / 4
    #   L OW1        -> L AH0 OW1 D    2 (AH0, D inserted) / 2
    # in two batches (the first example, then the other two). Exact match per batch 1/1 and 0/2 (1/3
    # over the epoch: Lightning weights by batch_size); word error rate 1 - exact match; PER over the
    # epoch = all edits / all reference phonemes = 4 / 10. Catches a mean of per-word rates (0.5), a
    # mean of per-batch rates (1/3), dividing by the output length (4 / 11), or edits over characters.
    task, tgt, logged = g2p_task(monkeypatch)
    assert task.is_g2p
    batches = [(["HH AH0 L OW1"], [tgt.encode("HH AH0 L OW1", eos=True) + [PAD, PAD]]),
               (["W ER1 L D", "L OW1"], [tgt.encode("W AH0 D", eos=True), tgt.encode("L AH0 OW1 D", eos=True)])]
    for (targets, outputs), want_exact in zip(batches, (1.0, 0.0)):
        width = max(map(len, outputs))
        out = torch.tensor([o + [PAD] * (width - len(o)) for o in outputs])
        monkeypatch.setattr(task, "decode_ids", lambda src, beam_size=1, out=out: out)
        tgt_ids = [tgt.encode(t, bos=True, eos=True) for t in targets]
        width = max(map(len, tgt_ids))
        batch = {"src": torch.full((len(targets), 3), 4), "tgt": torch.tensor([t + [PAD] * (width - len(t))
                                                                             for t in tgt_ids])}
        task._evaluate(batch, "val", beam_size=1)
        assert logged["val/exact_match"][0] == pytest.approx(want_exact)
        assert logged["val/exact_match"][1]["batch_size"] == len(targets)
        assert logged["val/wer"][0] == pytest.approx(1 - want_exact)
    assert logged["val/per"][0].compute().item() == pytest.approx(4 / 10)


def test_exact_match_is_the_whole_sequence(monkeypatch):
    # a prefix of the target, or the target plus one phoneme, is not a match: catches a comparison
    # over the shorter length (zip) or a match on the first phonemes only
    task, tgt, logged = g2p_task(monkeypatch)
    outputs = [tgt.encode("HH AH0 L", eos=True) + [PAD], tgt.encode("L OW1 D", eos=True) + [PAD]]
    monkeypatch.setattr(task, "decode_ids", lambda src, beam_size=1: torch.tensor(outputs))
    tgt_ids = [tgt.encode("HH AH0 L OW1", bos=True, eos=True), tgt.encode("L OW1", bos=True, eos=True) + [PAD] * 2]
    task._evaluate({"src": torch.full((2, 3), 4), "tgt": torch.tensor(tgt_ids)}, "val", beam_size=1)
    assert logged["val/exact_match"][0] == 0.0
    assert logged["val/per"][0].compute().item() == pytest.approx(2 / 6)  # 1 deletion + 1 insertion
