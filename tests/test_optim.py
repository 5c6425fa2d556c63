"""param_groups: exact decay / no-decay membership, and what AdamW then does with each group."""
import math

import pytest
import torch
from torch import nn

from zoo.optim import is_norm_module, param_groups


class MyRMSNorm(nn.Module):
    """A custom norm unknown to torch: excluded because its class name contains "Norm"."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.mix = nn.Parameter(torch.ones(dim, dim))  # 2-D, still excluded: it belongs to a norm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.gn = nn.GroupNorm(2, 4)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 2)
        self.rms = MyRMSNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, add_bias_kv=True)  # bias_k, bias_v are 3-D
        self.gamma = nn.Parameter(torch.ones(4))  # layer-scale style 1-D parameter
        self.proj = nn.Parameter(torch.randn(4, 4))  # a bare 2-D weight: decayed
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


class ViTish(nn.Module):
    """timm's hook: `no_weight_decay()` names (relative to this module) get no decay."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self):
        return {"pos_embed", "cls_*"}


def names(module, groups):
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [(sorted(by_id[id(p)] for p in g["params"]), g["weight_decay"]) for g in groups]


def test_exact_membership():
    net = Net()
    groups = param_groups(net, 0.05)
    assert names(net, groups) == [
        (sorted(["conv.weight", "fc.weight", "attn.in_proj_weight", "attn.out_proj.weight", "proj"]), 0.05),
        (sorted(["conv.bias", "bn.weight", "bn.bias", "ln.weight", "ln.bias", "gn.weight", "gn.bias",
                 "emb.weight", "fc.bias", "rms.weight", "rms.mix", "attn.in_proj_bias", "attn.bias_k",
                 "attn.bias_v", "attn.out_proj.bias", "gamma"]), 0.0),
    ]
    # Each trainable parameter exactly once; the frozen Linear nowhere.
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}


def test_norm_rule():
    import timm.layers

    for m in (nn.BatchNorm1d(3), nn.InstanceNorm2d(3, affine=True), nn.SyncBatchNorm(3), nn.LayerNorm(3),
              nn.GroupNorm(1, 3), nn.RMSNorm(3), MyRMSNorm(3), timm.layers.LayerNorm2d(3),
              timm.layers.RmsNorm(3), timm.layers.BatchNormAct2d(3)):
        assert is_norm_module(m), type(m).__name__
    assert not is_norm_module(nn.Linear(3, 3)) and not is_norm_module(nn.Conv2d(3, 3, 1))


def test_norm_wrapper_children_still_decay():
    # Only a norm module's own parameters are excluded, not those of modules it contains.
    class NormHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)
            self.fc = nn.Linear(4, 2)

    head = NormHead()
    assert names(head, param_groups(head, 0.1)) == [
        (["fc.weight"], 0.1), (["fc.bias", "norm.bias", "norm.weight"], 0.0)]


def test_timm_no_weight_decay_hook_and_shared_params():
    model = nn.Sequential(ViTish())
    assert names(model, param_groups(model, 0.1)) == [
        (["0.head.weight"], 0.1), (["0.cls_token", "0.head.bias", "0.pos_embed"], 0.0)]

    # A weight tied between an Embedding and a Linear: no decay wins, listed once.
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.out = nn.Linear(4, 6, bias=False)
            self.out.weight = self.emb.weight

    tied = Tied()
    groups = param_groups(tied, 0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["params"] == [tied.emb.weight]


def test_empty_groups_dropped():
    lin = nn.Linear(3, 2, bias=False)
    assert names(lin, param_groups(lin, 0.1)) == [(["weight"], 0.1)]
    ln = nn.LayerNorm(3)
    assert names(ln, param_groups(ln, 0.1)) == [(["bias", "weight"], 0.0)]
    assert param_groups(nn.Linear(3, 2).requires_grad_(False), 0.1) == []


def test_adamw_step_decays_only_the_decay_group():
    torch.manual_seed(0)
    net = Net()
    lr, wd = 0.1, 0.5
    opt = torch.optim.AdamW(param_groups(net, wd), lr=lr)
    # Zero gradients everywhere: Adam's update is 0 (m = v = 0), so only decoupled decay moves weights.
    for p in net.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    fc_w, ln_w = net.fc.weight.detach().clone(), net.ln.weight.detach().clone()
    emb_w = net.emb.weight.detach().clone()
    frozen_w = net.frozen.weight.detach().clone()
    opt.step()
    # AdamW: p <- p - lr * wd * p  (= p * (1 - 0.05) here), then the (zero) Adam step.
    torch.testing.assert_close(net.fc.weight.detach() - fc_w, -0.05 * fc_w, rtol=0, atol=1e-7)
    assert torch.equal(net.ln.weight.detach(), ln_w)
    assert torch.equal(net.emb.weight.detach(), emb_w)
    assert torch.equal(net.frozen.weight.detach(), frozen_w)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.AdamW, torch.optim.Adam])
def test_groups_accepted_by_optimizers(opt_cls):
    opt = opt_cls(param_groups(Net(), 1e-2), lr=1e-3)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-2, 0.0]


def _lrs(name, steps, **kw):
    from zoo.optim import lr_schedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=kw.pop("lr", 1.0))
    sched = lr_schedule(opt, name, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_noam_matches_paper_formula():
    lrs = _lrs("noam", 12000, d_model=512, warmup_steps=4000)
    for step in (1, 100, 4000, 4001, 11999):
        assert lrs[step - 1] == pytest.approx(512**-0.5 * min(step**-0.5, step * 4000**-1.5))
    assert max(range(12000), key=lrs.__getitem__) == 3999  # peak at the end of warm-up


def test_cosine_warmup_and_floor():
    lrs = _lrs("cosine", 101, lr=0.1, total_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)
    assert lrs[55] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(0.01)


def test_exponential_is_sketch_rnn_decay():
    lrs = _lrs("exponential", 5, lr=1e-3, min_lr_ratio=1e-5 / 1e-3, decay_rate=0.9999)
    assert lrs[4] == pytest.approx((1e-3 - 1e-5) * 0.9999**4 + 1e-5)


def test_schedule_errors_name_the_value():
    with pytest.raises(ValueError, match="'step'.*cosine"):
        _lrs("step", 1)
    with pytest.raises(ValueError, match="total_steps=None"):
        _lrs("cosine", 1)
