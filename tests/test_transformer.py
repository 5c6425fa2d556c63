"""The Transformer network: torch's nn.Transformer layers as reference, padding and causality of every
norm (through gradients), the masked / causal batch norm against torch's BatchNorm1d, KV cache, beam
search against exhaustive search, embeddings, input validation."""
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zoo.models.transformer import (Block, KVCache, TokenNorm, Transformer, TransformerLM, length_penalty,
                                    sinusoidal_positions)

torch.set_num_threads(1)
LM_NORMS = ("layer", "rms", "batch", "none")


def tiny_lm(norm="layer", position="pre", **kw):
    torch.manual_seed(0)
    return TransformerLM(11, d_model=16, n_heads=2, n_layers=2, d_ff=32, dropout=0.0, norm=norm,
                         norm_position=position, max_len=40, **kw)


def tiny_s2s(norm="layer", position="post", **kw):
    torch.manual_seed(0)
    return Transformer(9, 9, d_model=16, n_heads=2, num_encoder_layers=2, num_decoder_layers=2, d_ff=32,
                       dropout=0.0, norm=norm, norm_position=position, max_len=40, **kw)


# ------------------------------------------------------------------------------------------------
# torch's own layers as the reference for attention, padding masks and both norm positions

def _copy_common(ours: Block, ref) -> None:
    for p in ours.parameters():  # non-trivial norm affines and biases
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    ref.linear1.load_state_dict(ours.ff.fc1.state_dict())
    ref.linear2.load_state_dict(ours.ff.fc2.state_dict())
    ref.self_attn.in_proj_weight.data.copy_(ours.self_attn.qkv_proj.weight)
    ref.self_attn.in_proj_bias.data.copy_(ours.self_attn.qkv_proj.bias)
    ref.self_attn.out_proj.load_state_dict(ours.self_attn.out_proj.state_dict())


@pytest.mark.parametrize("position", ["post", "pre"])
def test_encoder_block_matches_torch_with_padding(position):
    torch.manual_seed(0)
    ours = Block(16, 4, 32, dropout=0.0, norm="layer", norm_position=position).eval()
    ref = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=position == "pre").eval()
    _copy_common(ours, ref)
    ref.norm1.load_state_dict(ours.norm1.norm.state_dict())
    ref.norm2.load_state_dict(ours.norm3.norm.state_dict())
    x = torch.randn(3, 7, 16)
    pad = torch.tensor([[False] * 7, [False] * 4 + [True] * 3, [False] * 2 + [True] * 5])
    keys = ~pad[:, None, None, :]
    with torch.no_grad():
        got = ours(x, pad_mask=pad, attn_mask=keys)
        want = ref(x, src_key_padding_mask=pad)
    real = ~pad
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", ["post", "pre"])
def test_decoder_block_matches_torch(position):
    torch.manual_seed(0)
    ours = Block(16, 4, 32, dropout=0.0, norm="layer", norm_position=position, causal=True, cross=True).eval()
    ref = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=position == "pre").eval()
    _copy_common(ours, ref)
    w, b = ours.cross_attn.q_proj, ours.cross_attn.kv_proj
    ref.multihead_attn.in_proj_weight.data.copy_(torch.cat([w.weight, b.weight]))
    ref.multihead_attn.in_proj_bias.data.copy_(torch.cat([w.bias, b.bias]))
    ref.multihead_attn.out_proj.load_state_dict(ours.cross_attn.out_proj.state_dict())
    for i, n in ((1, 1), (2, 2), (3, 3)):
        getattr(ref, f"norm{i}").load_state_dict(getattr(ours, f"norm{n}").norm.state_dict())
    x, mem = torch.randn(2, 6, 16), torch.randn(2, 5, 16)
    mem_pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        got = ours(x, is_causal=True, memory=mem, memory_mask=~mem_pad[:, None, None, :])
        want = ref(x, mem, tgt_mask=nn.Transformer.generate_square_subsequent_mask(6), tgt_is_causal=True,
                   memory_key_padding_mask=mem_pad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_encoder_ignores_padding_for_every_norm_in_training():
    # Appending pads must not change any real position: attention, and the batch statistics.
    for norm in LM_NORMS:
        m = tiny_s2s(norm).train()
        src = torch.tensor([[4, 5, 6, 7], [8, 4, 0, 0]])
        longer = F.pad(src, (0, 3))
        mem, pad = m.encode(src)
        mem2, pad2 = m.encode(longer)
        torch.testing.assert_close(mem2[:, :4][~pad], mem[~pad], msg=norm)
        assert (mem2[pad2] == 0).all() or norm != "batch"


def test_seq2seq_loss_and_logits_ignore_target_padding():
    for norm in LM_NORMS:
        m = tiny_s2s(norm, "pre").train()
        src = torch.tensor([[4, 5, 6, 0], [8, 4, 5, 6]])
        tgt = torch.tensor([[1, 5, 6, 2, 0], [1, 4, 2, 0, 0]])
        logits = m(src, tgt)
        longer = m(src, F.pad(tgt, (0, 4)))
        real = tgt != 0
        torch.testing.assert_close(longer[:, :5][real], logits[real], msg=norm)


@pytest.mark.parametrize("position", ["pre", "post"])
def test_padding_never_changes_batch_norm_statistics(position):
    # Extra source and target pads leave every running mean / variance (encoder and causal decoder)
    # as without them, and the real tokens' logits too (float64: float32 rounding differs with the shapes).
    a, b = tiny_s2s("batch", position).double().train(), tiny_s2s("batch", position).double().train()
    src = torch.tensor([[4, 5, 6, 0], [8, 4, 5, 6], [7, 0, 0, 0]])
    tgt = torch.tensor([[1, 5, 6, 2, 0], [1, 4, 2, 0, 0], [1, 7, 8, 4, 2]])
    for _ in range(2):
        logits = a(src, tgt)
        longer = b(F.pad(src, (0, 5)), F.pad(tgt, (0, 3)))
    torch.testing.assert_close(longer[:, :5][tgt != 0], logits[tgt != 0])
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    stats = [k for k in bufs_a if "running_" in k]
    assert len(stats) == 2 * (2 * 2 + 3 * 2 + 2 * (position == "pre"))  # mean + var of every batch norm
    for k in stats:
        torch.testing.assert_close(bufs_b[k], bufs_a[k], msg=k)
    moved = [k for k in stats if "running_mean" in k and bufs_a[k].abs().sum() > 0]
    assert len(moved) == len(stats) // 2  # the statistics were updated at all


# ------------------------------------------------------------------------------------------------
# batch norm over tokens: torch's BatchNorm1d on the real tokens is the reference

def _x_and_pad():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 4) * 3 + 1
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] + [True] * 4])
    return x, pad


def test_masked_batch_norm_uses_only_real_tokens_and_torch_running_stats():
    x, pad = _x_and_pad()
    tn = TokenNorm("batch", 4).train()
    ref = nn.BatchNorm1d(4)
    with torch.no_grad():
        tn.norm.bn.weight.uniform_(0.5, 2)
        tn.norm.bn.bias.uniform_(-1, 1)
    ref.load_state_dict(tn.norm.bn.state_dict())
    for _ in range(2):  # running statistics follow torch's momentum updates
        got = tn(x, pad)
        want = ref(x[~pad])
        torch.testing.assert_close(got[~pad], want)
        assert (got[pad] == 0).all()
    torch.testing.assert_close(tn.norm.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(tn.norm.bn.running_var, ref.running_var)
    assert tn.norm.bn.num_batches_tracked == ref.num_batches_tracked == 2
    tn.eval(), ref.eval()
    torch.testing.assert_close(tn(x, pad), ref(x.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_causal_batch_norm_is_batch_norm_over_the_prefix(momentum):
    x, pad = _x_and_pad()
    tn = TokenNorm("batch", 4, causal=True).train()
    tn.norm.bn.momentum = momentum
    with torch.no_grad():
        tn.norm.bn.weight.uniform_(0.5, 2)
        tn.norm.bn.bias.uniform_(-1, 1)
    state = {k: v.clone() for k, v in tn.norm.bn.state_dict().items()}
    got = tn(x, pad)
    for t in range(5):  # slow reference: torch's batch norm over the real tokens at positions <= t
        rows = ~pad[:, t]
        torch.testing.assert_close(got[:, t][rows], _prefix_norm(x, pad, t, state)[rows], atol=1e-5, rtol=1e-5)
    ref = nn.BatchNorm1d(4, momentum=momentum)
    ref.load_state_dict(state)
    ref(x[~pad])  # the running statistics come from all real tokens, with torch's momentum rule
    torch.testing.assert_close(tn.norm.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(tn.norm.bn.running_var, ref.running_var)
    assert (got[pad] == 0).all()


def _prefix_norm(x, pad, t, state):
    """(N, C): torch's training-mode batch norm of position t with statistics of real tokens <= t."""
    ref = nn.BatchNorm1d(4)
    ref.load_state_dict(state)
    keep = ~pad[:, : t + 1]
    normed = ref(x[:, : t + 1][keep])  # (M, C) in row-major (sample, position) order
    out = torch.zeros(x.shape[0], 4)
    idx = keep.flatten().nonzero().flatten()
    for j, flat in enumerate(idx.tolist()):
        n, s = divmod(flat, t + 1)
        if s == t:
            out[n] = normed[j]
    return out


def test_group_and_instance_norm_are_refused_with_the_reason():
    for norm in ("group", "instance"):
        for make, model in ((tiny_lm, "TransformerLM"), (tiny_s2s, "Transformer")):
            with pytest.raises(ValueError) as e:
                make(norm)
            assert str(e.value) == (f"norm={norm!r} cannot be used in {model}: its statistics pool over positions, "
                                    "a leak of the future (and of padding) into earlier tokens; accepted: batch, "
                                    "layer, rms, none")


def test_batch_norm_converts_to_sync_batch_norm():
    m = nn.SyncBatchNorm.convert_sync_batchnorm(tiny_lm("batch"))
    assert isinstance(m.blocks[0].norm1.norm.bn, nn.SyncBatchNorm)
    m.train()(torch.randint(0, 11, (2, 6)))  # runs (single process: plain batch norm)


# ------------------------------------------------------------------------------------------------
# causality through gradients

def _future_grad(model, train: bool, length=6) -> float:
    """max |d out[:, t] / d x[:, s]| over s > t, for embedded inputs x (N, L, C)."""
    model.train(train)
    torch.manual_seed(0)
    x = torch.randn(3, length, 16, requires_grad=True)
    leak = 0.0
    for t in range(length - 1):
        out = model.forward_blocks(x)
        (g,) = torch.autograd.grad(out[:, t].square().sum(), x)
        leak = max(leak, g[:, t + 1:].abs().max().item())
        assert g[:, : t + 1].abs().sum() > 0
    return leak


@pytest.mark.parametrize("norm,position", list(itertools.product(LM_NORMS, ["pre", "post"])))
def test_lm_is_causal_for_every_norm_in_train_and_eval(norm, position):
    model = tiny_lm(norm, position)
    assert _future_grad(model, train=True) == 0.0
    assert _future_grad(model, train=False) == 0.0


@pytest.mark.parametrize("norm,position", list(itertools.product(LM_NORMS, ["pre", "post"])))
def test_seq2seq_decoder_is_causal_for_every_norm_in_train_and_eval(norm, position):
    # Changing target tokens after t (every row of the batch) leaves the logits at <= t unchanged.
    model = tiny_s2s(norm, position)
    src = torch.tensor([[4, 5, 6, 0], [8, 4, 5, 6], [7, 6, 0, 0]])
    tgt = torch.tensor([[1, 5, 6, 7, 8, 4], [1, 4, 5, 5, 6, 7], [1, 8, 8, 4, 5, 6]])
    for train in (True, False):
        model.train(train)
        for t in range(5):
            other = tgt.clone()
            other[:, t + 1:] = torch.randint(4, 9, other[:, t + 1:].shape, generator=torch.Generator().manual_seed(t))
            with torch.no_grad():
                torch.testing.assert_close(model(src, other)[:, : t + 1], model(src, tgt)[:, : t + 1])


def test_causality_check_detects_a_leaking_batch_norm():
    model = tiny_lm("batch")
    for module in model.modules():
        if isinstance(module, TokenNorm):
            module.causal = False  # plain batch statistics over all positions
    assert _future_grad(model, train=True) > 1e-4


# ------------------------------------------------------------------------------------------------
# generation

@pytest.mark.parametrize("norm,position", [("layer", "pre"), ("batch", "post"), ("rms", "pre")])
def test_cached_generation_equals_uncached(norm, position):
    model = tiny_lm(norm, position)
    model.train()(torch.randint(0, 11, (4, 12)))  # batch norm gets non-trivial running statistics
    prompt = torch.randint(0, 11, (2, 5))
    a = model.generate(prompt, 20, greedy=True, use_cache=True)
    b = model.generate(prompt, 20, greedy=True, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 25) and torch.equal(a[:, :5], prompt)
    assert model.training  # restored
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(prompt, 20, temperature=0.9, top_k=5, generator=g1)
    s2 = model.generate(prompt, 20, temperature=0.9, top_k=5, use_cache=False, generator=g2)
    assert torch.equal(s1, s2)


def test_cache_with_several_new_tokens_is_bottom_right_aligned():
    # Feeding a sequence in chunks (queries shorter than keys) must give the full forward's logits.
    model = tiny_lm().eval()
    ids = torch.randint(0, 11, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.n_layers)
        chunks = [model(ids[:, :4], cache), model(ids[:, 4:7], cache), model(ids[:, 7:], cache)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="eval"):
        model.train()(ids, KVCache(model.n_layers))


def test_top_k_sampling_only_draws_from_the_top_k():
    model = tiny_lm().eval()
    prompt = torch.randint(0, 11, (1, 3))
    with torch.no_grad():
        top2 = model(prompt)[0, -1].topk(2).indices
    for seed in range(10):
        out = model.generate(prompt, 1, top_k=2, temperature=5.0, generator=torch.Generator().manual_seed(seed))
        assert out[0, -1] in top2


def test_seq2seq_greedy_cached_equals_uncached_and_beam_one_equals_greedy():
    model = tiny_s2s(position="pre")
    src = torch.tensor([[4, 5, 6, 7, 8], [8, 7, 6, 0, 0]])
    a = model.greedy_decode(src, 1, 2, 12, use_cache=True)
    b = model.greedy_decode(src, 1, 2, 12, use_cache=False)
    assert torch.equal(a, b)
    assert torch.equal(model.beam_search(src, 1, 2, 12, beam_size=1), a)


def _brute_force_best(model, src, bos, eos, vocab, max_len, alpha):
    """The final hypothesis (ends in eos, or reaches max_len) with the best log p / length penalty."""
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=max_len)))
    tgt_in = torch.cat([torch.full((len(seqs), 1), bos), seqs[:, :-1]], 1)
    with torch.no_grad():
        logp = F.log_softmax(model(src.expand(len(seqs), -1), tgt_in), -1)
    prefix = logp.gather(2, seqs[..., None])[..., 0].cumsum(1)  # log p of seq[:n], n = 1..max_len
    best, best_score = None, -math.inf
    for i, seq in enumerate(seqs.tolist()):
        for n in range(1, max_len + 1):
            if eos in seq[: n - 1]:
                break
            if seq[n - 1] == eos or n == max_len:
                score = prefix[i, n - 1] / length_penalty(torch.tensor(n), alpha)
                if score > best_score:
                    best, best_score = seq[:n], score
    return best


@pytest.mark.parametrize("seed,alpha", [(20, 0.0), (20, 0.6), (25, 0.6)])
def test_exhaustive_beam_search_finds_the_best_length_penalised_sequence(seed, alpha):
    # With as many beams as hypotheses, beam search is exhaustive: compare with brute force. Seed 20
    # picks a different output for alpha 0 and 0.6; for seed 25 the best output is not the greedy one.
    torch.manual_seed(seed)
    model = Transformer(5, 5, 8, 2, 1, 1, 16, 0.0, max_len=8).eval()
    with torch.no_grad():
        model.head.weight.mul_(3)  # a peaked but non-trivial distribution
    src, bos, eos, vocab, max_len = torch.tensor([[3, 4, 2]]), 1, 2, 5, 4
    best = _brute_force_best(model, src, bos, eos, vocab, max_len, alpha)
    got = model.beam_search(src, bos, eos, max_len, beam_size=vocab ** max_len, alpha=alpha)[0].tolist()
    assert got[: len(best)] == best and all(t == 0 for t in got[len(best):])
    other = _brute_force_best(model, src, bos, eos, vocab, max_len, 0.6 - alpha)
    greedy = model.greedy_decode(src, bos, eos, max_len)[0].tolist()
    assert (other != best) if seed == 20 else (greedy != best)


# ------------------------------------------------------------------------------------------------
# embeddings and structure

def test_sinusoidal_positions_match_the_paper_formula():
    pe = sinusoidal_positions(50, 8)
    for pos, i in [(0, 0), (7, 1), (49, 3)]:
        assert pe[pos, 2 * i].item() == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
        assert pe[pos, 2 * i + 1].item() == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_embeddings_are_scaled_and_tied():
    lm = tiny_lm(pos_encoding="learned")
    assert lm.head.weight is lm.embed.tok.weight
    ids = torch.tensor([[3, 4]])
    lm.eval()
    want = lm.embed.tok.weight[ids] * 4.0 + lm.embed.pos.weight[:2]  # sqrt(16) = 4
    torch.testing.assert_close(lm.embed(ids), want)
    s2s = tiny_s2s(share_embeddings=True)
    assert s2s.head.weight is s2s.tgt_embed.tok.weight is s2s.src_embed.tok.weight
    assert tiny_s2s().src_embed.tok.weight is not tiny_s2s().tgt_embed.tok.weight
    with pytest.raises(ValueError, match="share_embeddings"):
        Transformer(5, 6, 16, 2, share_embeddings=True)


def test_norm_positions():
    pre, post = tiny_lm("layer", "pre"), tiny_lm("layer", "post")
    assert pre.final_norm is not None and post.final_norm is None
    # post: every block ends in a layer norm (per-token mean 0 / var 1 with the initial affine)
    post.eval()
    out = post.forward_blocks(torch.randn(2, 5, 16) * 10)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="norm_position"):
        tiny_lm("layer", "middle")
    with pytest.raises(ValueError, match="unknown norm kind"):
        tiny_lm("bogus")


def test_none_norm_trains_with_pre():
    model = tiny_lm("none", "pre")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.arange(24).remainder(11).view(2, 12)  # a deterministic pattern to memorise
    losses = []
    for _ in range(60):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.2 * losses[0]


def test_none_norm_pre_and_post_are_the_same_network():
    # What the docs say about norm="none" with post: identity norms, no final norm, same function.
    pre, post = tiny_lm("none", "pre"), tiny_lm("none", "post")
    assert [n for n, _ in pre.named_parameters()] == [n for n, _ in post.named_parameters()]
    ids = torch.randint(0, 11, (2, 9))
    torch.testing.assert_close(pre.train()(ids), post.train()(ids))


def test_context_limit_is_a_clear_error():
    model = tiny_lm()
    with pytest.raises(ValueError, match="max_len=40"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), 20)
    out = model.generate(torch.zeros(1, 30, dtype=torch.long), 20, greedy=True, use_cache=False)
    assert out.shape == (1, 50)  # uncached slides a window


def test_causal_batch_norm_of_one_sequence_is_a_clear_error():
    with pytest.raises(ValueError, match="batch size > 1"):
        TokenNorm("batch", 4, causal=True).train()(torch.randn(1, 5, 4))


# ------------------------------------------------------------------------------------------------
# input validation: one clear error naming the bad value and what is accepted

@pytest.mark.parametrize("ids", [torch.randint(0, 11, (4,)), torch.randint(0, 11, (2, 4, 1)),
                                 torch.randint(0, 11, (2, 4)).float(), torch.zeros(2, 0, dtype=torch.long),
                                 torch.zeros(0, 3, dtype=torch.long)])
def test_lm_forward_refuses_ids_that_are_not_a_nonempty_n_by_l_int64_tensor(ids):
    want = (f"ids must be token ids of shape (N, L) with N, L >= 1 and dtype int64, got shape {tuple(ids.shape)} "
            f"and dtype {ids.dtype}")
    with pytest.raises(ValueError, match=re.escape(want)):
        tiny_lm()(ids)


def test_lm_generation_arguments_are_checked_up_front():
    model = tiny_lm()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with pytest.raises(ValueError, match=re.escape("top_k must be None (all tokens) or >= 1, got 0")):
        model.generate(ids, 2, top_k=0)
    with pytest.raises(ValueError, match=re.escape("max_new_tokens must be >= 0, got -1")):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match=re.escape("temperature must be > 0 for sampling, got 0.0")):
        model.generate(ids, 0, temperature=0.0)  # refused even when no token is drawn
    with pytest.raises(ValueError, match=re.escape("ids must lie in [0, 11), the vocabulary, got ids from 1 to 11")):
        model.generate(torch.tensor([[1, 11]]), 2)
    with pytest.raises(ValueError, match=re.escape("ids must lie in [0, 11), the vocabulary, got ids from -1 to 2")):
        model.generate(torch.tensor([[-1, 2]]), 2)
    assert torch.equal(model.generate(ids, 0), ids)
    assert model.generate(ids, 2, greedy=True, temperature=0.0).shape == (2, 5)  # temperature unused by argmax
    assert model.generate(ids, 2, top_k=1).shape == (2, 5)


def test_vocabulary_sizes_must_be_positive():
    with pytest.raises(ValueError, match=re.escape("vocab_size must be >= 1, got 0")):
        TransformerLM(0, d_model=16, n_heads=2, n_layers=1)
    with pytest.raises(ValueError, match=re.escape("src_vocab_size must be >= 1, got 0")):
        Transformer(0, 9, d_model=16, n_heads=2, num_encoder_layers=1, num_decoder_layers=1)
    with pytest.raises(ValueError, match=re.escape("tgt_vocab_size must be >= 1, got 0")):
        Transformer(7, 0, d_model=16, n_heads=2, num_encoder_layers=1, num_decoder_layers=1)


def test_seq2seq_forward_refuses_bad_ids_and_different_batch_sizes():
    model = tiny_s2s()
    src, tgt = torch.randint(1, 9, (3, 5)), torch.randint(1, 9, (3, 4))
    with pytest.raises(ValueError, match=re.escape("src and tgt must have the same batch size, got 3 and 2")):
        model(src, tgt[:2])
    with pytest.raises(ValueError, match=re.escape("tgt must be token ids of shape (N, L) with N, L >= 1 and dtype "
                                                   "int64, got shape (3, 4) and dtype torch.float32")):
        model(src, tgt.float())
    with pytest.raises(ValueError, match=re.escape("src must be token ids of shape (N, L) with N, L >= 1 and dtype "
                                                   "int64, got shape (3, 0) and dtype torch.int64")):
        model(src[:, :0], tgt)


def test_seq2seq_decoding_arguments_are_checked_up_front():
    torch.manual_seed(0)
    model = Transformer(7, 9, d_model=16, n_heads=2, num_encoder_layers=1, num_decoder_layers=2, max_len=10)
    src = torch.randint(1, 7, (3, 5))
    for decode in (model.greedy_decode, model.beam_search):
        for max_out in (11, -1):
            with pytest.raises(ValueError, match=re.escape(f"max_len must be in [0, 10], the model's max_len "
                                                           f"(decoding feeds bos and every output but the last), "
                                                           f"got {max_out}")):
                decode(src, 1, 2, max_out)
        # the last output is never fed back: max_len outputs use positions 0..max_len-1 and fit
        assert decode(src, 1, 2, 10).shape[1] <= 10
        assert decode(src, 1, 2, 0).shape == (3, 0)
        with pytest.raises(ValueError, match=re.escape("bos_id must lie in [0, 9), the target vocabulary, got 9")):
            decode(src, 9, 2, 5)
        with pytest.raises(ValueError, match=re.escape("eos_id must lie in [0, 9), the target vocabulary, got -1")):
            decode(src, 1, -1, 5)
        with pytest.raises(ValueError, match=re.escape("src must lie in [0, 7), the vocabulary, got ids from 1 to 7")):
            decode(torch.tensor([[1, 7]]), 1, 2, 5)
    assert model.greedy_decode(src, 1, 2, 10, use_cache=False).shape[1] <= 10
    with pytest.raises(ValueError, match=re.escape("beam_size must be >= 1, got 0")):
        model.beam_search(src, 1, 2, 6, beam_size=0)
