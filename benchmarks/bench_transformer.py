"""Speed of zoo's Transformer, as ratios against references measured in the same run.

    python benchmarks/bench_transformer.py                      # CPU, float32, 1 thread
    python benchmarks/bench_transformer.py --device cuda --dtype bfloat16 --batch 64 --seq 256

1. Training tokens/s (forward + backward + AdamW step) of
   - the decoder-only LM vs the same-size `nn.TransformerEncoder` (causal mask, pre-norm, same
     embedding and tied head around it), and
   - the encoder-decoder vs the same-size `nn.Transformer` (post-norm, key padding masks);
   - the LM with `F.scaled_dot_product_attention` replaced by naive matmul-softmax attention.
2. Generation tokens/s at --new-tokens new tokens: with the KV cache vs without (greedy).
3. Training step time with norm="rms" vs norm="layer".

Each timing is the median of --repeats interleaved measurements (the machine may be shared); on CPU
it is the process's CPU time, not wall time, so other processes on the machine do not count.
Generation uses nanoGPT's baby-GPT shape by default (--gen-d-model 384, 6 layers, 6 heads).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import zoo.models.transformer as T


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class TorchLM(nn.Module):
    """nn.TransformerEncoder with a causal mask between the same embedding and tied head as ours."""

    def __init__(self, ours: T.TransformerLM, d, heads, layers, d_ff, dropout):
        super().__init__()
        self.embed, self.head = ours.embed, ours.head  # identical embedding / head work
        layer = nn.TransformerEncoderLayer(d, heads, d_ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d), enable_nested_tensor=False)

    def forward(self, ids):
        mask = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], device=ids.device)
        return self.head(self.encoder(self.embed(ids), mask=mask, is_causal=True))


class TorchSeq2Seq(nn.Module):
    """nn.Transformer between the same embeddings and head as ours."""

    def __init__(self, ours: T.Transformer, d, heads, layers, d_ff, dropout):
        super().__init__()
        self.src_embed, self.tgt_embed, self.head = ours.src_embed, ours.tgt_embed, ours.head
        self.net = nn.Transformer(d, heads, layers, layers, d_ff, dropout, batch_first=True)

    def forward(self, src, tgt):
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], device=tgt.device)
        src_pad = src == 0
        out = self.net(self.src_embed(src), self.tgt_embed(tgt), tgt_mask=mask, tgt_is_causal=True,
                       src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
        return self.head(out)


def naive_sdpa(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0, **_):
    """Matmul-softmax attention, the obvious way."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if is_causal:
        lq, lk = scores.shape[-2:]
        attn_mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = F.dropout(scores.softmax(-1), dropout_p)
    return weights @ v


def train_step_fn(model, make_loss):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss = make_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def timed(fn, device, iters):
    """Seconds per call: process CPU time on CPU (robust on a shared machine; the runs are
    single-threaded by default), wall time with synchronisation on CUDA."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    sync(device)
    t = clock()
    for _ in range(iters):
        fn()
    sync(device)
    return (clock() - t) / iters


def compare(fns: dict, device, iters, repeats, warmup=3):
    """{name: fn} -> {name: median seconds per call}, measured interleaved."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, device, iters))
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--gen-d-model", type=int, default=384)
    p.add_argument("--gen-heads", type=int, default=6)
    p.add_argument("--gen-layers", type=int, default=6)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parts", default="train,generate,norm", help="which of train, generate, norm to run")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    d, h, n, ff, b, L, V = a.d_model, a.heads, a.layers, 4 * a.d_model, a.batch, a.seq, a.vocab
    print(f"device={device} dtype={a.dtype} threads={torch.get_num_threads()} d_model={d} heads={h} layers={n} "
          f"d_ff={ff} batch={b} seq={L} dropout={a.dropout} (torch {torch.__version__})")
    torch.manual_seed(0)
    ids = torch.randint(4, V, (b, L + 1), device=device)
    tokens = b * L

    def lm_loss(model):
        with autocast:
            logits = model(ids[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    def make_lm(norm="layer"):
        return T.TransformerLM(V, d, h, n, ff, a.dropout, norm, "pre", max_len=max(L, a.new_tokens + 16)).to(device)

    parts = set(a.parts.split(","))
    if "train" in parts:
        train_speed(a, device, autocast, ids, tokens, lm_loss, make_lm)
    if "generate" in parts:
        generate_speed(a, device, autocast, ids)
    if "norm" in parts:
        rms, layer = make_lm("rms"), make_lm("layer")
        t = compare({"rms": train_step_fn(rms, lm_loss), "layer": train_step_fn(layer, lm_loss)}, device,
                    a.iters, a.repeats)
        print(f"\n[norm step time, LM training] rms {t['rms'] * 1e3:.1f} ms, layer {t['layer'] * 1e3:.1f} ms; "
              f"rms / layer = {t['rms'] / t['layer']:.3f} (<= 1 means rms is not slower)")


def train_speed(a, device, autocast, ids, tokens, lm_loss, make_lm):
    d, h, n, ff, b, L, V = a.d_model, a.heads, a.layers, 4 * a.d_model, a.batch, a.seq, a.vocab
    # 1a. LM vs nn.TransformerEncoder; naive attention
    ours, ours_naive = make_lm(), make_lm()
    ref = TorchLM(make_lm(), d, h, n, ff, a.dropout).to(device)
    n_ours = sum(p.numel() for p in ours.parameters())
    n_ref = sum(p.numel() for p in ref.parameters())
    step_ours, step_ref = train_step_fn(ours, lm_loss), train_step_fn(ref, lm_loss)
    step_naive_inner = train_step_fn(ours_naive, lm_loss)

    def step_naive():
        sdpa, T.F.scaled_dot_product_attention = T.F.scaled_dot_product_attention, naive_sdpa
        try:
            step_naive_inner()
        finally:
            T.F.scaled_dot_product_attention = sdpa

    t = compare({"ours": step_ours, "torch": step_ref, "naive": step_naive}, device, a.iters, a.repeats)
    print(f"\n[LM training, {n_ours} vs {n_ref} params] tokens/s: ours {tokens / t['ours']:.0f}, "
          f"nn.TransformerEncoder {tokens / t['torch']:.0f}, ours with naive attention {tokens / t['naive']:.0f}")
    print(f"  ratio ours / nn.TransformerEncoder = {t['torch'] / t['ours']:.3f}x (goal >= 0.95x)")
    print(f"  ratio ours (SDPA) / ours (naive attention) = {t['naive'] / t['ours']:.3f}x")

    # 1b. encoder-decoder vs nn.Transformer (sources with padding)
    torch.manual_seed(0)
    src = torch.randint(4, V, (b, L), device=device)
    src[b // 2:, L // 2:] = 0  # half the batch padded
    tgt = torch.randint(4, V, (b, L + 1), device=device)

    def s2s_loss(model):
        with autocast:
            logits = model(src, tgt[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tgt[:, 1:].flatten())

    def make_s2s():
        return T.Transformer(V, V, d, h, n, n, ff, a.dropout, "layer", "post", max_len=L + 1).to(device)

    s_ours = make_s2s()
    s_ref = TorchSeq2Seq(make_s2s(), d, h, n, ff, a.dropout).to(device)
    t = compare({"ours": train_step_fn(s_ours, s2s_loss), "torch": train_step_fn(s_ref, s2s_loss)},
                device, a.iters, a.repeats)
    s2s_tokens = int((src != 0).sum()) + tgt[:, 1:].numel()
    print(f"\n[encoder-decoder training, {sum(p.numel() for p in s_ours.parameters())} vs "
          f"{sum(p.numel() for p in s_ref.parameters())} params] tokens/s: ours {s2s_tokens / t['ours']:.0f}, "
          f"nn.Transformer {s2s_tokens / t['torch']:.0f}")
    print(f"  ratio ours / nn.Transformer = {t['torch'] / t['ours']:.3f}x (goal >= 0.95x)")


def generate_speed(a, device, autocast, ids):
    # 2. generation with and without the KV cache
    gd, V = a.gen_d_model, a.vocab
    gen = T.TransformerLM(V, gd, a.gen_heads, a.gen_layers, 4 * gd, a.dropout, "layer", "pre",
                          max_len=a.new_tokens + 16).to(device).eval()
    prompt = ids[:1, :16]

    def run(cache):
        def go():
            with autocast:
                return gen.generate(prompt, a.new_tokens, greedy=True, use_cache=cache)
        return go

    assert torch.equal(run(True)(), run(False)())
    t = compare({"cached": run(True), "uncached": run(False)}, device, 1, max(3, a.repeats // 2), warmup=1)
    print(f"\n[generation, d_model {gd}, {a.gen_layers} layers, batch 1, prompt 16, {a.new_tokens} new tokens] "
          f"tokens/s: cached "
          f"{a.new_tokens / t['cached']:.0f}, uncached {a.new_tokens / t['uncached']:.0f}; ratio "
          f"{t['uncached'] / t['cached']:.2f}x (goal >= 5x); same tokens: yes")


if __name__ == "__main__":
    main()
