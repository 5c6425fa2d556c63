"""The Transformer of Vaswani et al. 2017 ("Attention Is All You Need"), small and readable.

Two shapes from the same `Block`:
    `Transformer`    encoder-decoder (paper, Fig. 1): encoder blocks (self-attention + feed-forward),
                     decoder blocks (causal self-attention + cross-attention + feed-forward), shared
                     source/target embeddings as an option and tied decoder input/output embeddings.
    `TransformerLM`  decoder-only language model (causal self-attention + feed-forward, as GPT) with
                     tied input/output embeddings.

Shapes: N batch, S source length, L target / sequence length, C = d_model, H heads, V vocabulary.
Token ids are int64; `pad_id` (default 0) marks padding, always on the right of a sequence.

Paper details kept: token embeddings scaled by sqrt(d_model) (initialised N(0, d_model^-0.5), so the
scaled embedding has unit variance and the tied output layer starts small), sinusoidal positions
(learned as an option), dropout on the embedding sum, on each sub-layer output before the residual
add, inside the feed-forward and on the attention weights (the last two as torch's nn.Transformer).
Attention runs through `F.scaled_dot_product_attention`, so fused (flash / memory-efficient) kernels
are used where torch has them.

Normalization (`norm`, a `zoo.norm` kind, and `norm_position`):
    post  x = norm(x + sublayer(x))          the paper; no final norm.
    pre   x = x + sublayer(norm(x))          GPT-2 and later; a final norm after the last block.
    With norm="none" (identity) both placements give the same network, x = x + sublayer(x) with no
    final norm: pre-norm trains (the residual stream is a plain sum, each sub-layer sees it
    unnormalized), and post-norm is exactly that network, so it trains identically (same seed, same
    numbers; see benchmarks/README.md). Nothing bounds the residual stream's growth over depth,
    so deep stacks or the paper's learning rates may need a smaller lr or warm-up.
Norms act on tokens (`TokenNorm`). Per-token norms (layer, rms, none) cannot see padding or the
future. Batch norm computes per-channel statistics over tokens, so `TokenNorm` makes it:
    - padding-safe: only real tokens enter the statistics (and the running estimates); pads are set to 0;
    - causal-safe in causal stacks (the LM, the seq2seq decoder): in training, position t is
      normalized with the statistics of all real tokens at positions <= t of the batch (cumulative
      sums), so output t never depends on inputs after t; in eval it uses the running statistics,
      which are per token. The running estimates are updated from all real tokens of the batch, with
      torch's momentum semantics (unbiased variance, momentum=None = cumulative average).
Which kinds are accepted is read from their declarations (`zoo.norm.norm_spec`): a kind whose
statistics pool over positions (group, instance) would leak the future in a causal stack and mix pads
into real tokens, and one that pools over the batch would mix in other sequences' pads, so both are
refused with a ValueError, except the built-in batch norm that `TokenNorm` recomputes as above. A norm
registered with `zoo.norm.register_norm` is accepted once declared per token (pools_positions=False,
pools_batch=False).

Generation keeps a key/value cache (`KVCache`). SDPA's `is_causal=True` aligns the causal mask to the
top-left corner, which is wrong once the queries (new tokens) are fewer than the keys (cache + new
tokens); with a cache the mask is built explicitly, aligned bottom-right (query i sits at absolute
position offset + i).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.models.config import network_config
from zoo.models.inference import inference
from zoo.norm import NormSpec, build_norm, check_norm

__all__ = ["Transformer", "TransformerConfig", "TransformerLM", "TransformerLMConfig", "Block", "Attention", "FeedForward", "TokenNorm",
           "Embeddings", "KVCache", "sinusoidal_positions", "length_penalty", "check_args", "NORM_POSITIONS",
           "POS_ENCODINGS", "ACTIVATIONS"]

NORM_POSITIONS = ("post", "pre")
POS_ENCODINGS = ("sinusoidal", "learned")
ACTIVATIONS = ("relu", "gelu")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")


def _check_size(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


def check_args(cfg) -> None:
    """The choices of a `TransformerLMConfig` / `TransformerConfig`, checked without building the network:
    a task checks them before any data is read, and builds the network once the vocabulary is fitted."""
    _check_choice("norm_position", cfg.norm_position, NORM_POSITIONS)
    _check_choice("pos_encoding", cfg.pos_encoding, POS_ENCODINGS)
    _check_choice("activation", cfg.activation, ACTIVATIONS)
    _check_token_norm(cfg.norm, cfg.network.__name__)


# ---------------------------------------------------------------------------------------------------
# normalization over tokens

def _token_norm_refusal(kind: str, spec: NormSpec) -> str | None:
    """Why norm `kind` cannot normalize tokens in this module (None: it can); for `check_norm`."""
    if kind == "batch":  # TokenNorm recomputes its statistics over real tokens at positions <= t
        return None
    if spec.pools_positions:
        return "its statistics pool over positions, a leak of the future (and of padding) into earlier tokens"
    if spec.pools_batch:
        return "its statistics pool over the batch and would mix in other sequences' padding"
    return None


def _check_token_norm(kind: str, model: str) -> None:
    """Raise the one-line ValueError of `zoo.norm.check_norm` unless `model` can use norm `kind`."""
    check_norm(kind, model, layouts=("nlc",), refuse=_token_norm_refusal)


class TokenNorm(nn.Module):
    """A `zoo.norm` kind applied to token sequences (N, L, C), aware of padding and causality.

    `self.norm` is exactly `build_norm(kind, C, layout="nlc")`; for batch norm that holds a torch
    `_BatchNorm` child (`self.norm.bn`), so `nn.SyncBatchNorm.convert_sync_batchnorm` converts it and
    its running buffers are the ones updated here. See the module docstring for the semantics.

    Args:
        kind: norm kind name ("layer", "rms", "batch", "none", ...).
        num_features: C.
        causal: the stack this norm sits in is causal (statistics may not look ahead in time).
    """

    def __init__(self, kind: str, num_features: int, causal: bool = False):
        super().__init__()
        _check_token_norm(kind, type(self).__name__)
        self.norm = build_norm(kind, num_features, layout="nlc")
        self.kind, self.causal = kind, causal
        self.is_batch = kind == "batch"  # a BatchNormNLC: built-in kinds are never replaced

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """x (N, L, C), pad_mask (N, L) bool, True at pads (or None) -> (N, L, C)."""
        if not self.is_batch:
            return self.norm(x)  # per-token: pads and the future cannot enter
        bn = self.norm.bn
        if not (bn.training or bn.running_mean is None):
            return self.norm(x)  # running statistics: per token
        if self.causal:
            return self._causal_batch_norm(x, pad_mask)
        if pad_mask is None or not pad_mask.any():
            return self.norm(x)
        # Only real tokens enter the statistics: run the (Sync)BatchNorm child on the (M, C) real
        # tokens, so its own kernel, running buffers and cross-process sync are used as they are.
        keep = ~pad_mask
        if int(keep.sum()) < 2:
            raise ValueError(f"batch norm over a padded batch of shape {tuple(x.shape)} with "
                             f"{int(keep.sum())} real token(s): need at least 2 per channel")
        return torch.zeros_like(x).masked_scatter(keep[..., None], bn(x[keep]))

    def _causal_batch_norm(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        bn = self.norm.bn
        n, length, c = x.shape
        if n < 2:  # right padding: position 0 is real in every sequence, so it has n values
            raise ValueError(f"causal batch norm: input of shape {tuple(x.shape)} has one sequence, so position 0 "
                             "has one value per channel and its variance is undefined; use a batch size > 1 or "
                             "'layer' / 'rms'")
        keep = (torch.ones(n, length, 1, device=x.device) if pad_mask is None
                else (~pad_mask)[..., None].float())
        xf = x.float() * keep
        # per position: [count, sum, sum of squares] over the batch's real tokens, (L, 1 + 2C)
        stats = torch.cat([keep.sum(0), xf.sum(0), (xf * xf).sum(0)], dim=-1)
        if isinstance(bn, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size(bn.process_group or dist.group.WORLD) > 1:
            from torch.distributed.nn.functional import all_reduce  # differentiable
            stats = all_reduce(stats, group=bn.process_group or dist.group.WORLD)
        stats = stats.cumsum(0)  # statistics of positions <= t
        count = stats[:, :1].clamp_min(1)
        mean = stats[:, 1:1 + c] / count
        var = (stats[:, 1 + c:] / count - mean * mean).clamp_min(0)
        y = (x.float() - mean) * torch.rsqrt(var + bn.eps)
        if bn.affine:
            y = y * bn.weight + bn.bias
        if bn.track_running_stats:  # from all real tokens of the batch, as bn(x[keep]) would
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
                total = count[-1]
                bn.running_mean.lerp_(mean[-1].to(bn.running_mean.dtype), momentum)
                unbiased = var[-1] * total / (total - 1).clamp_min(1)
                bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
        return (y * keep).to(x.dtype)

    def extra_repr(self) -> str:
        return f"causal={self.causal}"


# ---------------------------------------------------------------------------------------------------
# attention, feed-forward, block

@dataclass
class KVCache:
    """Keys and values of the positions decoded so far, per decoder layer: (N, H, T, C/H) each.

    `cross` holds the projected encoder memory per layer (computed once). `length` is T.
    """

    num_layers: int
    keys: list = field(init=False)
    values: list = field(init=False)
    cross: list = field(init=False)

    def __post_init__(self):
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.cross = [None] * self.num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows `index` (beam search): every cached tensor is indexed along dim 0."""
        for store in (self.keys, self.values):
            for i, t in enumerate(store):
                if t is not None:
                    store[i] = t.index_select(0, index)
        for i, kv in enumerate(self.cross):
            if kv is not None:
                self.cross[i] = tuple(t.index_select(0, index) for t in kv)


class Attention(nn.Module):
    """Multi-head scaled dot-product attention (paper Sec. 3.2) through F.scaled_dot_product_attention.

    Self-attention projects q, k, v with one fused (C, 3C) linear; cross-attention projects q from the
    decoder and k, v from the encoder memory.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True, cross: bool = False):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout, self.cross = n_heads, dropout, cross
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:  # (N, L, C) -> (N, H, L, C/H)
        n, length, c = x.shape
        return x.view(n, length, self.n_heads, c // self.n_heads).transpose(1, 2)

    def forward(self, x: Tensor, memory: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (N, Lq, C); memory (N, S, C) for cross-attention; attn_mask broadcastable to
        (N, H, Lq, Lk) bool, True = may attend -> (N, Lq, C)."""
        if self.cross:
            q = self._heads(self.q_proj(x))
            if cache is not None and cache.cross[layer] is not None:
                k, v = cache.cross[layer]
            else:
                k, v = map(self._heads, self.kv_proj(memory).chunk(2, dim=-1))
                if cache is not None:
                    cache.cross[layer] = (k, v)
        else:
            q, k, v = map(self._heads, self.qkv_proj(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.append(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        n, _, length, _ = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(n, length, -1))


class FeedForward(nn.Module):
    """Position-wise feed-forward (paper Eq. 2): linear(C, d_ff) -> activation -> dropout -> linear(d_ff, C)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, activation: str = "relu", bias: bool = True):
        super().__init__()
        _check_choice("activation", activation, ACTIVATIONS)
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class Block(nn.Module):
    """One Transformer layer: self-attention [+ cross-attention] + feed-forward, each a residual
    sub-layer with dropout and a `TokenNorm` placed by `norm_position`.

    Encoder layer: causal=False, cross=False. Decoder layer: causal=True, cross=True. Decoder-only
    (LM) layer: causal=True, cross=False.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.1, norm: str = "layer",
                 norm_position: str = "post", causal: bool = False, cross: bool = False,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        _check_choice("norm_position", norm_position, NORM_POSITIONS)
        self.pre = norm_position == "pre"
        self.self_attn = Attention(d_model, n_heads, dropout, bias)
        self.norm1 = TokenNorm(norm, d_model, causal)
        self.cross_attn = Attention(d_model, n_heads, dropout, bias, cross=True) if cross else None
        self.norm2 = TokenNorm(norm, d_model, causal) if cross else None
        self.ff = FeedForward(d_model, d_ff, dropout, activation, bias)
        self.norm3 = TokenNorm(norm, d_model, causal)
        self.drop = nn.Dropout(dropout)

    def _sublayer(self, x: Tensor, fn, norm: TokenNorm, pad_mask: Tensor | None) -> Tensor:
        if self.pre:
            return x + self.drop(fn(norm(x, pad_mask)))
        return norm(x + self.drop(fn(x)), pad_mask)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False, memory: Tensor | None = None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (N, L, C); pad_mask (N, L) True at pads; attn_mask / is_causal for self-attention;
        memory (N, S, C) and memory_mask (N, 1, 1, S) True = real, for cross-attention -> (N, L, C)."""
        x = self._sublayer(x, lambda h: self.self_attn(h, attn_mask=attn_mask, is_causal=is_causal,
                                                       cache=cache, layer=layer), self.norm1, pad_mask)
        if self.cross_attn is not None:
            x = self._sublayer(x, lambda h: self.cross_attn(h, memory, attn_mask=memory_mask, cache=cache,
                                                            layer=layer), self.norm2, pad_mask)
        return self._sublayer(x, self.ff, self.norm3, pad_mask)


# ---------------------------------------------------------------------------------------------------
# embeddings

def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """Paper Sec. 3.5: PE[pos, 2i] = sin(pos / 10000^(2i/C)), PE[pos, 2i+1] = cos(...). (max_len, C)."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq[: d_model // 2])
    return pe.float()


class Embeddings(nn.Module):
    """Token embedding * sqrt(C) + positional encoding, then dropout. (N, L) ids -> (N, L, C)."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int, dropout: float = 0.1,
                 pos_encoding: str = "sinusoidal", pad_id: int | None = 0):
        super().__init__()
        _check_choice("pos_encoding", pos_encoding, POS_ENCODINGS)
        self.d_model, self.max_len = d_model, max_len
        self.tok = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        if pos_encoding == "learned":
            self.pos = nn.Embedding(max_len, d_model)
        else:  # a deterministic function of the shape: not saved in checkpoints
            self.register_buffer("pe", sinusoidal_positions(max_len, d_model), persistent=False)
            self.pos = None
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        length = ids.shape[1]
        if start + length > self.max_len:
            raise ValueError(f"sequence positions {start}..{start + length - 1} exceed max_len={self.max_len}; "
                             "use shorter sequences or a model with a larger max_len")
        pos = self.pos.weight[start:start + length] if self.pos is not None else self.pe[start:start + length]
        return self.drop(self.tok(ids) * math.sqrt(self.d_model) + pos)


def _init_weights(module: nn.Module, d_model: int) -> None:
    """Xavier-uniform linear weights and zero biases (as tensor2tensor and nn.Transformer), embeddings
    N(0, C^-0.5) so that embedding * sqrt(C) has unit variance (tensor2tensor)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=d_model ** -0.5)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


def _self_attn_mask(pad_mask: Tensor | None, causal: bool, q_len: int, offset: int, device) -> tuple:
    """(attn_mask, is_causal) for self-attention of q_len queries at positions offset.. over keys
    0..offset+q_len-1. Uses SDPA's is_causal (fused kernels) only where it is right: no cache offset."""
    k_len = offset + q_len
    if causal and pad_mask is None:
        if offset == 0:
            return None, q_len > 1
        if q_len == 1:
            return None, False  # one new token may see every cached key
    mask = None
    if causal:  # bottom-right aligned: query i sits at absolute position offset + i
        mask = (torch.arange(k_len, device=device)[None, :]
                <= torch.arange(offset, k_len, device=device)[:, None])[None, None]
    if pad_mask is not None:  # (N, 1, 1, k_len) True at real keys
        keys = ~pad_mask[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask, False


def _check_prompt(ids: Tensor, name: str = "ids", vocab_size: int | None = None) -> None:
    """Token ids must be a non-empty (N, L) int64 tensor (free: shape and dtype only). With `vocab_size`
    they must also lie in [0, vocab_size): that reads the values back (a device sync), so only the
    generation entry points pass it, never the training forward."""
    if ids.dim() != 2 or ids.numel() == 0 or ids.dtype != torch.long:
        raise ValueError(f"{name} must be token ids of shape (N, L) with N, L >= 1 and dtype int64, got shape "
                         f"{tuple(ids.shape)} and dtype {ids.dtype}")
    if vocab_size is not None:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), the vocabulary, got ids from {lo} to {hi}")


def _next_token(logits: Tensor, greedy: bool, temperature: float, top_k: int | None,
                generator: torch.Generator | None) -> Tensor:
    """(N, V) logits -> (N, 1) next ids: argmax, or a sample at `temperature` from the top_k."""
    if greedy:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# ---------------------------------------------------------------------------------------------------
# the two networks

class TransformerLM(nn.Module):
    """Decoder-only Transformer language model: (N, L) token ids -> (N, L, V) next-token logits.

    Args:
        vocab_size: V.
        d_model, n_heads, n_layers, d_ff: sizes (paper base: 512, 8, 6, 2048); d_ff None is 4 * d_model.
        dropout: on embeddings, sub-layer outputs, feed-forward hidden units and attention weights.
        norm: a `zoo.norm` kind whose statistics are per token ("layer", "rms", "none", or registered
            with pools_positions=False, pools_batch=False), or "batch" (made causal here).
        norm_position: "pre" (GPT-2, default here; final norm added) or "post" (the paper).
        max_len: the longest context (positions 0..max_len-1).
        pos_encoding: "sinusoidal" (paper) or "learned" (GPT).
        tie_embeddings: the output layer uses the token embedding matrix (paper Sec. 3.4).
        activation: "relu" (paper) or "gelu" (GPT).
        bias: biases in the linear layers.
    """

    def __init__(self, vocab_size: int, d_model: int = 512, n_heads: int = 8, n_layers: int = 6,
                 d_ff: int | None = None, dropout: float = 0.1, norm: str = "layer", norm_position: str = "pre",
                 max_len: int = 1024, pos_encoding: str = "sinusoidal", tie_embeddings: bool = True,
                 activation: str = "relu", bias: bool = True):
        super().__init__()
        _check_size("vocab_size", vocab_size)
        _check_choice("norm_position", norm_position, NORM_POSITIONS)
        _check_token_norm(norm, type(self).__name__)
        self.vocab_size, self.max_len, self.n_layers = vocab_size, max_len, n_layers
        d_ff = d_ff or 4 * d_model
        self.embed = Embeddings(vocab_size, d_model, max_len, dropout, pos_encoding, pad_id=None)
        self.blocks = nn.ModuleList([
            Block(d_model, n_heads, d_ff, dropout, norm, norm_position, causal=True, activation=activation, bias=bias)
            for _ in range(n_layers)])
        self.final_norm = TokenNorm(norm, d_model, causal=True) if norm_position == "pre" else None
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        _init_weights(self, d_model)
        if tie_embeddings:
            self.head.weight = self.embed.tok.weight

    def forward_blocks(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        """Embedded tokens (N, L, C) at positions cache.length.. -> final features (N, L, C)."""
        if cache is not None and self.training:
            raise RuntimeError("the KV cache is for inference: call model.eval() first")
        offset = cache.length if cache is not None else 0
        mask, is_causal = _self_attn_mask(None, True, x.shape[1], offset, x.device)
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=mask, is_causal=is_causal, cache=cache, layer=i)
        return self.final_norm(x) if self.final_norm is not None else x

    def forward_features(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """(N, L) int64 ids, N, L >= 1 (ValueError otherwise) -> (N, L, C) features."""
        _check_prompt(ids)
        return self.forward_blocks(self.embed(ids, cache.length if cache is not None else 0), cache)

    def forward_head(self, h: Tensor) -> Tensor:
        return self.head(h)

    def forward(self, ids: Tensor, cache: KVCache | None = None) -> Tensor:
        """(N, L) int64 ids -> (N, L, V) logits; with a cache, ids continue the cached positions."""
        return self.forward_head(self.forward_features(ids, cache))

    @inference
    def generate(self, ids: Tensor, max_new_tokens: int, greedy: bool = False, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """Continue prompts (N, L) -> (N, L + max_new_tokens): argmax, or sampling at `temperature`
        from the `top_k` most likely tokens. Runs in eval mode (restored afterwards).

        With the cache the whole sequence must fit in max_len (ValueError otherwise); without it the
        context is cropped to the last max_len tokens (as nanoGPT). ids must lie in [0, V);
        max_new_tokens >= 0 (0 returns the prompt); top_k None (all tokens) or >= 1; temperature > 0
        unless greedy.
        """
        _check_prompt(ids, vocab_size=self.vocab_size)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None (all tokens) or >= 1, got {top_k}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}; use greedy=True for argmax")
        if use_cache and ids.shape[1] + max_new_tokens > self.max_len:
            raise ValueError(f"prompt length {ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_len={self.max_len}; generate fewer tokens or use use_cache=False (slides "
                             "a window of max_len tokens)")
        cache = KVCache(self.n_layers) if use_cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            if cache is None:
                step_input = ids[:, -self.max_len:]
            logits = self(step_input, cache)[:, -1]
            nxt = _next_token(logits.float(), greedy, temperature, top_k, generator)
            ids = torch.cat([ids, nxt], dim=1)
            if cache is not None:
                step_input = nxt
        return ids


TransformerLMConfig = network_config(TransformerLM, given=("vocab_size", "max_len"))


def length_penalty(length: Tensor, alpha: float) -> Tensor:
    """Wu et al. 2016 (GNMT), used by the paper's beam search: ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length.float()) / 6.0) ** alpha


class Transformer(nn.Module):
    """Encoder-decoder Transformer (paper Fig. 1): source ids (N, S), target input ids (N, L) ->
    (N, L, V_tgt) logits.

    Args:
        src_vocab_size, tgt_vocab_size: vocabularies (equal when share_embeddings).
        d_model, n_heads, num_encoder_layers, num_decoder_layers, d_ff, dropout: sizes (paper base:
            512, 8, 6, 6, 2048, 0.1); d_ff None is 4 * d_model.
        norm, norm_position: as `TransformerLM`; "post" (the paper) by default.
        max_len: the longest source or target sequence.
        pos_encoding, activation, bias: as `TransformerLM`.
        share_embeddings: one embedding matrix for source and target tokens (paper Sec. 3.4).
        tie_embeddings: the decoder's output layer uses its input embedding matrix.
        pad_id: the padding id of both vocabularies.
    """

    def __init__(self, src_vocab_size: int, tgt_vocab_size: int, d_model: int = 512, n_heads: int = 8,
                 num_encoder_layers: int = 6, num_decoder_layers: int = 6, d_ff: int | None = None,
                 dropout: float = 0.1, norm: str = "layer", norm_position: str = "post", max_len: int = 256,
                 pos_encoding: str = "sinusoidal", activation: str = "relu", bias: bool = True,
                 share_embeddings: bool = False, tie_embeddings: bool = True, pad_id: int = 0):
        super().__init__()
        _check_size("src_vocab_size", src_vocab_size)
        _check_size("tgt_vocab_size", tgt_vocab_size)
        _check_choice("norm_position", norm_position, NORM_POSITIONS)
        _check_token_norm(norm, type(self).__name__)
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"share_embeddings needs one vocabulary, got src_vocab_size={src_vocab_size} "
                             f"and tgt_vocab_size={tgt_vocab_size}")
        self.pad_id, self.num_decoder_layers, self.max_len = pad_id, num_decoder_layers, max_len
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        d_ff = d_ff or 4 * d_model
        self.src_embed = Embeddings(src_vocab_size, d_model, max_len, dropout, pos_encoding, pad_id)
        self.tgt_embed = Embeddings(tgt_vocab_size, d_model, max_len, dropout, pos_encoding, pad_id)
        blk = dict(d_model=d_model, n_heads=n_heads, d_ff=d_ff, dropout=dropout, norm=norm,
                   norm_position=norm_position, activation=activation, bias=bias)
        self.encoder = nn.ModuleList([Block(**blk) for _ in range(num_encoder_layers)])
        self.decoder = nn.ModuleList([Block(**blk, causal=True, cross=True) for _ in range(num_decoder_layers)])
        pre = norm_position == "pre"
        self.encoder_norm = TokenNorm(norm, d_model) if pre else None
        self.decoder_norm = TokenNorm(norm, d_model, causal=True) if pre else None
        self.head = nn.Linear(d_model, tgt_vocab_size, bias=False)
        _init_weights(self, d_model)
        if share_embeddings:
            self.tgt_embed.tok.weight = self.src_embed.tok.weight
        if tie_embeddings:
            self.head.weight = self.tgt_embed.tok.weight

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """(N, S) source ids -> memory (N, S, C) and its pad mask (N, S), True at pads."""
        pad = src == self.pad_id
        mask, _ = _self_attn_mask(pad, False, src.shape[1], 0, src.device)
        x = self.src_embed(src)
        for block in self.encoder:
            x = block(x, pad_mask=pad, attn_mask=mask)
        return (self.encoder_norm(x, pad) if self.encoder_norm is not None else x), pad

    def decode(self, tgt: Tensor, memory: Tensor, memory_pad: Tensor, cache: KVCache | None = None) -> Tensor:
        """Target input ids (N, L) (continuing the cached positions), memory (N, S, C), memory_pad
        (N, S) -> logits (N, L, V_tgt)."""
        if cache is not None and self.training:
            raise RuntimeError("the KV cache is for inference: call model.eval() first")
        offset = cache.length if cache is not None else 0
        # Right padding + causal mask: a real query never sees a pad key, so the decoder's
        # self-attention needs no key-padding mask; pads still stay out of the norm statistics.
        pad = tgt == self.pad_id if cache is None else None
        mask, is_causal = _self_attn_mask(None, True, tgt.shape[1], offset, tgt.device)
        memory_mask = ~memory_pad[:, None, None, :]
        x = self.tgt_embed(tgt, offset)
        for i, block in enumerate(self.decoder):
            x = block(x, pad_mask=pad, attn_mask=mask, is_causal=is_causal, memory=memory,
                      memory_mask=memory_mask, cache=cache, layer=i)
        if self.decoder_norm is not None:
            x = self.decoder_norm(x, pad)
        return self.head(x)

    def forward(self, src: Tensor, tgt: Tensor) -> Tensor:
        """Teacher forcing: (N, S) source, (N, L) target input (bos + target[:-1]), both int64 with the
        same N -> (N, L, V_tgt)."""
        _check_prompt(src, "src")
        _check_prompt(tgt, "tgt")
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(f"src and tgt must have the same batch size, got {src.shape[0]} and {tgt.shape[0]}")
        memory, memory_pad = self.encode(src)
        return self.decode(tgt, memory, memory_pad)

    def _check_decoding(self, src: Tensor, bos_id: int, eos_id: int, max_len: int) -> None:
        """The arguments of `greedy_decode` and `beam_search`, checked before any decoding."""
        _check_prompt(src, "src", self.src_vocab_size)
        for name, token in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= token < self.tgt_vocab_size:
                raise ValueError(f"{name} must lie in [0, {self.tgt_vocab_size}), the target vocabulary, got {token}")
        if not 0 <= max_len <= self.max_len:  # the last output is never fed back, so max_len itself fits
            raise ValueError(f"max_len must be in [0, {self.max_len}], the model's max_len (decoding feeds bos and "
                             f"every output but the last), got {max_len}")

    @inference
    def greedy_decode(self, src: Tensor, bos_id: int, eos_id: int, max_len: int,
                      use_cache: bool = True) -> Tensor:
        """(N, S) source (int64, ids in [0, V_src)) -> (N, <= max_len) output ids without bos, eos
        included, pads after eos; 0 <= max_len <= the model's max_len."""
        self._check_decoding(src, bos_id, eos_id, max_len)
        memory, memory_pad = self.encode(src)
        n = src.shape[0]
        out = torch.full((n, 1), bos_id, dtype=torch.long, device=src.device)
        done = torch.zeros(n, dtype=torch.bool, device=src.device)
        cache = KVCache(self.num_decoder_layers) if use_cache else None
        for _ in range(max_len):
            step = out[:, -1:] if cache is not None else out
            nxt = self.decode(step, memory, memory_pad, cache)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, self.pad_id)
            out = torch.cat([out, nxt[:, None]], dim=1)
            done |= nxt == eos_id
            if done.all():
                break
        return out[:, 1:]

    @inference
    def beam_search(self, src: Tensor, bos_id: int, eos_id: int, max_len: int, beam_size: int = 4,
                    alpha: float = 0.6) -> Tensor:
        """Beam search with the GNMT length penalty (paper Sec. 6.1: beam 4, alpha 0.6).

        Finished hypotheses stay in the beam (extended by pads at no cost); the output is the beam
        with the best log-probability / length_penalty(length incl. eos, alpha).
        (N, S) source -> (N, <= max_len) ids, as `greedy_decode`; beam_size >= 1.
        """
        self._check_decoding(src, bos_id, eos_id, max_len)
        _check_size("beam_size", beam_size)
        n, k, dev = src.shape[0], beam_size, src.device
        memory, memory_pad = self.encode(src)
        memory = memory.repeat_interleave(k, 0)
        memory_pad = memory_pad.repeat_interleave(k, 0)
        cache = KVCache(self.num_decoder_layers)
        seqs = torch.full((n * k, 1), bos_id, dtype=torch.long, device=dev)
        scores = torch.full((n, k), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start equal: expand only the first
        done = torch.zeros(n * k, dtype=torch.bool, device=dev)
        lengths = torch.zeros(n * k, dtype=torch.long, device=dev)
        for _ in range(max_len):
            logp = F.log_softmax(self.decode(seqs[:, -1:], memory, memory_pad, cache)[:, -1].float(), -1)
            vocab = logp.shape[-1]
            # a finished beam continues only with a pad, at no cost
            finished = torch.full_like(logp, float("-inf"))
            finished[:, self.pad_id] = 0.0
            logp = torch.where(done[:, None], finished, logp)
            cand = (scores.view(n * k, 1) + logp).view(n, k * vocab)
            scores, flat = cand.topk(k, dim=-1)
            beam = flat // vocab
            tok = (flat % vocab).view(-1)
            rows = (beam + torch.arange(n, device=dev)[:, None] * k).view(-1)
            cache.reorder(rows)
            seqs = torch.cat([seqs[rows], tok[:, None]], dim=1)
            done, lengths = done[rows], lengths[rows] + (~done[rows]).long()
            done = done | (tok == eos_id)
            if done.all():
                break
        best = (scores / length_penalty(lengths.view(n, k), alpha)).argmax(-1)
        rows = best + torch.arange(n, device=dev) * k
        return seqs[rows, 1:]


TransformerConfig = network_config(Transformer, given=("src_vocab_size", "tgt_vocab_size", "pad_id"))
