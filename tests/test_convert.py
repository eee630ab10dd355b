"""genfast.convert: what it swaps, what it leaves, and that converted models train exactly like
the originals (outputs, gradients, optimiser steps, state_dict both ways)."""
import contextlib
import copy

import pytest
import torch
from torch import nn

import genfast
import genfast.nn as gnn
from genfast import models
from tests.utils import assert_close


def _fused(seq):
    """(kind, first index, last index) of the fusions that run now in a FusedSequential."""
    if not isinstance(seq, gnn.FusedSequential):
        return []
    index = {id(m): i for i, m in enumerate(seq)}
    return [(st.kind, index[id(st.modules[0])], index[id(st.modules[-1])]) for st in seq.active_fusions()]


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.3, 0.3)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.2, 0.2)
                    m.running_var.uniform_(0.5, 1.5)


def _pair(model):
    _randomise_bn(model)
    model = model.double()
    conv = copy.deepcopy(model)
    genfast.convert(conv)
    return model, conv


def _train_steps(model, inputs, steps=2):
    # SGD with momentum: Adam divides by |grad| and would amplify float64 rounding noise in
    # near-zero gradients into visible parameter differences.
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    outs = []
    for _ in range(steps):
        opt.zero_grad()
        y = model(*inputs)
        (y.double() ** 2).mean().backward()
        opt.step()
        outs.append(y.detach())
    return outs, [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_same_training(orig, conv, inputs):
    assert list(orig.state_dict()) == list(conv.state_dict())
    for train in (True, False):
        orig.train(train)
        conv.train(train)
        torch.manual_seed(0)
        yo, go = _train_steps(orig, inputs)
        torch.manual_seed(0)
        yc, gc = _train_steps(conv, inputs)
        for a, b in zip(yc, yo):
            assert_close(a, b, torch.float64, "output")
        for a, b in zip(gc, go):
            assert_close(a, b, torch.float64, "gradient", scale=100)
        for (k, a), (_, b) in zip(conv.state_dict().items(), orig.state_dict().items()):
            assert_close(a.double(), b.double(), torch.float64, f"state {k}", scale=100)


def test_bn_act_in_sequential_is_fused():
    seq = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.LeakyReLU(0.2, inplace=True),
                        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(),
                        nn.Linear(8, 4), nn.BatchNorm1d(4), nn.Tanh())
    orig, conv = _pair(seq)
    assert isinstance(conv, gnn.FusedSequential)
    # Linear -> BatchNorm1d -> act triples (issue 14); the last BatchNorm is followed by Tanh,
    # which is neither fused after a BatchNorm nor with it
    assert _fused(conv) == [("conv_bn_act", 0, 2), ("conv_bn_act", 3, 5)]
    # BN followed by something else is not fused; every child stays the torch module it was
    assert [type(m) for m in conv] == [type(m) for m in orig]
    _assert_same_training(orig, conv, (torch.randn(5, 6, dtype=torch.float64),))


def test_parameters_are_the_same_objects():
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    w, rm = seq[1].weight, seq[1].running_mean
    opt = torch.optim.SGD(seq.parameters(), lr=0.1)
    genfast.convert(seq)
    assert seq[1].weight is w and seq[1].running_mean is rm
    assert any(p is w for g in opt.param_groups for p in g["params"])


def test_state_dict_round_trip_both_ways():
    orig = models.MLPGenerator(nz=8, out_dim=12, hidden=(16, 16))
    _randomise_bn(orig)
    conv = genfast.convert(copy.deepcopy(orig))
    fresh_conv = genfast.convert(models.MLPGenerator(nz=8, out_dim=12, hidden=(16, 16)))
    fresh_conv.load_state_dict(orig.state_dict(), strict=True)
    fresh_orig = models.MLPGenerator(nz=8, out_dim=12, hidden=(16, 16))
    fresh_orig.load_state_dict(conv.state_dict(), strict=True)
    z = torch.randn(4, 8)
    orig.eval(), fresh_conv.eval(), fresh_orig.eval()
    assert_close(fresh_conv(z), orig(z), torch.float32, "checkpoint into converted")
    assert_close(fresh_orig(z), orig(z), torch.float32, "converted checkpoint into original")


def test_convert_twice_is_harmless_and_skip_and_report():
    seq = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.LeakyReLU())
    model, report = genfast.convert(seq, skip={"2"}, return_report=True)
    assert len(report) == 1 and "BatchNormAct2d" in str(report) and "skipped 2" in str(report)
    assert _fused(model) == [("bn_act", 0, 1)]
    before = [type(m) for m in model.modules()]
    plan = model.fusion_plan()
    _, report2 = genfast.convert(model, skip={"2"}, return_report=True)
    assert len(report2) == 0 and [type(m) for m in model.modules()] == before
    assert [s.modules for _, s in model.fusion_plan()] == [s.modules for _, s in plan]


def test_nothing_outside_the_patterns_is_touched():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)
            self.act = nn.ReLU()  # not in a Sequential: order of use is unknown

        def forward(self, x):
            return self.act(self.bn(x))

    model = nn.Sequential(Custom(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Dropout(), nn.ReLU())
    types = [type(m) for m in model.modules()]
    _, report = genfast.convert(model, return_report=True)
    assert len(report) == 0 and [type(m) for m in model.modules()] == types


@pytest.mark.parametrize("name,inputs", [
    ("mlp_generator", lambda: (torch.randn(6, 100, dtype=torch.float64),)),
    ("conditional_generator", lambda: (torch.randn(6, 100, dtype=torch.float64), torch.randint(0, 10, (6,)))),
    ("conv_vae_encoder", lambda: (torch.rand(3, 1, 28, 28, dtype=torch.float64),)),
    ("keras_dcgan_discriminator", lambda: (torch.randn(3, 1, 28, 28, dtype=torch.float64),)),
])
def test_seed_models_train_identically(name, inputs):
    if name == "conv_vae_encoder":
        model = models.ConvVAE().enc
    else:
        model = models.MODELS[name]()
    orig, conv = _pair(model)
    assert any(isinstance(m, gnn.FusedSequential) and m.active_fusions() for m in conv.modules())
    _assert_same_training(orig, conv, inputs())


# --- transposed convolutions: swaps, epilogues, the ConvT -> BN -> act block ----------------------

def test_conv_transpose_swaps_and_epilogues():
    seq = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.LeakyReLU(0.2),
                        nn.ConvTranspose2d(3, 2, 3, 1, 1), nn.Tanh(),
                        nn.ConvTranspose2d(2, 2, 3, 1, 1), nn.Sigmoid(),
                        nn.ConvTranspose2d(2, 2, 1), nn.ReLU())
    orig, conv = _pair(seq)
    assert all(type(conv[i]) is gnn.ConvTranspose2d and conv[i].activation is None for i in (0, 3, 5, 7))
    assert _fused(conv) == [("conv_bn_act", 0, 2), ("conv_act", 3, 4), ("conv_act", 5, 6)]
    # a ReLU right after a transposed convolution (no BatchNorm) is not in the list: it stays
    assert isinstance(conv[8], nn.ReLU)
    _assert_same_training(orig, conv, (torch.randn(2, 4, 5, 3, dtype=torch.float64),))


def test_conv_transpose_outside_sequential_is_swapped():
    class Up(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(3, 2, 2, 2)
            self.act = nn.Tanh()  # not in a Sequential: not fused

        def forward(self, x):
            return self.act(self.up(x))

    orig, conv = _pair(Up())
    assert isinstance(conv.up, gnn.ConvTranspose2d) and conv.up.activation is None
    assert isinstance(conv.act, nn.Tanh)
    _assert_same_training(orig, conv, (torch.randn(2, 3, 3, 3, dtype=torch.float64),))


def test_fuse_conv_bn_false_keeps_the_batchnorm_separate():
    seq = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.ReLU())
    conv = genfast.convert(seq, fuse_conv_bn=False)
    assert _fused(conv) == [("bn_act", 1, 2)]


@pytest.mark.parametrize("name,make_inputs", [
    ("dcgan_generator", lambda: (torch.randn(3, 8, dtype=torch.float64),)),
    ("dcgan_discriminator", lambda: (torch.randn(3, 3, 64, 64, dtype=torch.float64),)),
    ("keras_dcgan_generator", lambda: (torch.randn(3, 8, dtype=torch.float64),)),
    ("conv_vae", None),
])
def test_conv_seed_models_train_identically(name, make_inputs):
    kwargs = {"dcgan_generator": dict(nz=8, ngf=4), "dcgan_discriminator": dict(ndf=4),
              "keras_dcgan_generator": dict(nz=8, width=16), "conv_vae": dict(width=8)}[name]
    orig, conv = _pair(models.MODELS[name](**kwargs))
    assert any(isinstance(m, gnn.FusedSequential) and m.active_fusions() for m in conv.modules())
    if name == "conv_vae":
        # the VAE draws eps: compare encoder + decoder paths with the same seed
        x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
        for train in (True, False):
            orig.train(train)
            conv.train(train)
            torch.manual_seed(5)
            ro, mo, lo = orig(x)
            torch.manual_seed(5)
            rc, mc, lc = conv(x)
            assert_close(rc, ro, torch.float64, "recon")
            assert_close(mc, mo, torch.float64, "mu")
        return
    _assert_same_training(orig, conv, make_inputs())


# --- hooks, spectral / weight norm, parametrizations (issue 11, item 10) -------------------------

def _hook_log(model, names, log, pre=False):
    """Register on the named submodules a hook that records the tensor it sees."""
    mods = dict(model.named_modules())
    for n in names:
        if pre:
            mods[n].register_forward_pre_hook(lambda m, args, n=n: log.append((n, args[0].detach().clone())))
        else:
            mods[n].register_forward_hook(lambda m, args, out, n=n: log.append((n, out.detach().clone())))


def _assert_same_logs(log_c, log_o):
    assert [n for n, _ in log_c] == [n for n, _ in log_o] and log_o
    for (n, a), (_, b) in zip(log_c, log_o):
        assert_close(a, b, torch.float64, f"hook at {n}")


def _sn_convt(*args, **kwargs):
    return nn.utils.spectral_norm(nn.ConvTranspose2d(*args, **kwargs))


def _p_sn_convt(*args, **kwargs):
    return nn.utils.parametrizations.spectral_norm(nn.ConvTranspose2d(*args, **kwargs))


def _p_wn_convt(*args, **kwargs):
    return nn.utils.parametrizations.weight_norm(nn.ConvTranspose2d(*args, **kwargs))


def _wn_convt(*args, **kwargs):
    with pytest.warns(FutureWarning):
        return nn.utils.weight_norm(nn.ConvTranspose2d(*args, **kwargs))


@pytest.mark.parametrize("wrap", [_sn_convt, _p_sn_convt, _wn_convt, _p_wn_convt],
                         ids=["spectral_norm", "parametrizations.spectral_norm", "weight_norm",
                              "parametrizations.weight_norm"])
@pytest.mark.parametrize("with_bn", [False, True])
def test_normalised_conv_transpose_converts_and_trains_identically(wrap, with_bn):
    def build():  # twice from one seed: torch.nn.utils.weight_norm modules cannot be deep-copied
        torch.manual_seed(0)
        layers = [wrap(8, 4, 4, 2, 1)] + ([nn.BatchNorm2d(4), nn.ReLU()] if with_bn else [nn.Tanh()])
        model = nn.Sequential(*layers).double()
        _randomise_bn(model)
        return model

    orig = build()
    conv, report = genfast.convert(build(), return_report=True)
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    # the normalised convolution is never fused with what follows; the report says why
    assert all(first != 0 for _, first, _ in _fused(conv))
    if wrap in (_p_sn_convt, _p_wn_convt):
        assert "parametrized ConvTranspose2d" in str(report)
    else:
        assert type(conv[0]) is gnn.ConvTranspose2d and conv[0]._forward_pre_hooks
        assert "forward pre-hook" in str(report)
    if with_bn:  # the BatchNorm -> ReLU pair behind it is still fused
        assert _fused(conv) == [("bn_act", 1, 2)]
    assert list(conv.state_dict()) == list(orig.state_dict())
    _assert_same_training(orig, conv, (x,))


class _SNGANGenerator(nn.Module):
    """An SNGAN-style generator: spectral norm on every layer, BatchNorm + ReLU blocks."""

    def __init__(self, nz=8, ngf=4):
        super().__init__()
        self.ngf = ngf
        self.fc = nn.utils.spectral_norm(nn.Linear(nz, 4 * 4 * ngf * 4))
        self.main = nn.Sequential(
            nn.BatchNorm2d(ngf * 4), nn.ReLU(),
            _sn_convt(ngf * 4, ngf * 2, 4, 2, 1), nn.BatchNorm2d(ngf * 2), nn.ReLU(),
            _sn_convt(ngf * 2, ngf, 4, 2, 1), nn.BatchNorm2d(ngf), nn.ReLU(),
            nn.utils.spectral_norm(nn.Conv2d(ngf, 3, 3, 1, 1)), nn.Tanh())

    def forward(self, z):
        return self.main(self.fc(z).view(z.shape[0], self.ngf * 4, 4, 4))


def test_sngan_generator_trains_identically():
    torch.manual_seed(1)
    orig, conv = _pair(_SNGANGenerator())
    assert _fused(conv.main) == [("bn_act", 0, 1), ("bn_act", 3, 4), ("bn_act", 6, 7)]
    assert sum(type(m) is gnn.ConvTranspose2d for m in conv.modules()) == 2
    _assert_same_training(orig, conv, (torch.randn(4, 8, dtype=torch.float64),))
    # the converted checkpoint loads into the original and back
    fresh = _SNGANGenerator().double()
    fresh.load_state_dict(conv.state_dict(), strict=True)
    genfast.convert(fresh).load_state_dict(orig.state_dict(), strict=True)


@pytest.mark.parametrize("where", ["conv", "bn", "act"])
@pytest.mark.parametrize("pre", [False, True])
def test_hooks_registered_before_convert_keep_firing(where, pre):
    orig = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.LeakyReLU(0.2),
                         nn.ConvTranspose2d(3, 2, 3, 1, 1), nn.Tanh()).double()
    _randomise_bn(orig)
    conv = copy.deepcopy(orig)
    name = {"conv": "0", "bn": "1", "act": "2"}[where]
    log_o, log_c = [], []
    _hook_log(orig, [name, "4"], log_o, pre)
    _hook_log(conv, [name, "4"], log_c, pre)
    conv, report = genfast.convert(conv, return_report=True)
    # the hooked triple is not fused (the report says why); the hooked Tanh is not either
    assert f"{name} has forward {'pre-' if pre else ''}hook" in str(report)
    hooked_kinds = {k for k, _, _ in _fused(conv)}
    assert "conv_bn_act" not in hooked_kinds and "conv_act" not in hooked_kinds
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for train in (True, False):
        orig.train(train), conv.train(train)
        log_o.clear(), log_c.clear()
        assert_close(conv(x), orig(x), torch.float64, "output")
        _assert_same_logs(log_c, log_o)


# --- a fusion stands down when a child is replaced, hooked or retyped after convert (item 11) -----

def _triple():
    torch.manual_seed(2)
    orig = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.ConvTranspose2d(3, 2, 3, 1, 1), nn.Sigmoid()).double()
    _randomise_bn(orig)
    conv = genfast.convert(copy.deepcopy(orig))
    assert _fused(conv) == [("conv_bn_act", 0, 2), ("conv_act", 3, 4)]
    return orig, conv


def _check_same(orig, conv, x):
    for train in (True, False):
        orig.train(train), conv.train(train)
        assert_close(conv(x), orig(x), torch.float64, f"output (train={train})")
    assert list(conv.state_dict()) == list(orig.state_dict())
    for (k, a), (_, b) in zip(conv.state_dict().items(), orig.state_dict().items()):
        assert_close(a.double(), b.double(), torch.float64, f"state {k}")


@pytest.mark.parametrize("change", ["replace_bn", "replace_act", "replace_conv", "retype_act",
                                    "parametrize_conv", "spectral_norm_conv", "delete_act"])
def test_fusion_stands_down_when_a_child_is_replaced(change):
    orig, conv = _triple()
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64)
    if change == "replace_bn":
        for m in (orig, conv):
            m[1] = nn.GroupNorm(1, 3).double()
        conv[1].load_state_dict(orig[1].state_dict())
    elif change == "replace_act":
        orig[2], conv[2] = nn.ELU(), nn.ELU()
    elif change == "replace_conv":
        for m in (orig, conv):
            new = nn.ConvTranspose2d(4, 3, 4, 2, 1).double()
            new.load_state_dict(orig[0].state_dict())
            m[0] = new
    elif change == "retype_act":  # same object, new class
        orig[2].__class__ = nn.SiLU
        conv[2].__class__ = nn.SiLU
    elif change == "parametrize_conv":
        for m in (orig, conv):
            nn.utils.parametrize.register_parametrization(m[0], "weight", _Double())
    elif change == "spectral_norm_conv":
        for m in (orig, conv):
            torch.manual_seed(6)  # the same initial power-iteration vectors
            nn.utils.spectral_norm(m[0])
    elif change == "delete_act":
        del orig[2]
        del conv[2]
    assert ("conv_bn_act", 0, 2) not in _fused(conv)
    torch.manual_seed(0)
    _check_same(orig, conv, x)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("where", ["0", "1", "2", "global"])
@pytest.mark.parametrize("kind", ["forward", "pre", "backward"])
def test_hook_added_after_convert_sees_the_unfused_tensors(where, kind):
    orig, conv = _triple()
    x = torch.randn(3, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    logs = {"orig": [], "conv": []}
    handles = []

    def hook_for(log):
        if kind == "forward":
            return lambda m, args, out: log.append(out.detach().clone())
        if kind == "pre":
            return lambda m, args: log.append(args[0].detach().clone())
        return lambda m, gin, gout: log.append(gout[0].detach().clone())

    for label, model in (("orig", orig), ("conv", conv)):
        if where == "global":
            reg = {"forward": nn.modules.module.register_module_forward_hook,
                   "pre": nn.modules.module.register_module_forward_pre_hook,
                   "backward": nn.modules.module.register_module_full_backward_hook}[kind]
            continue_ = label == "conv"  # one global hook serves both models
            if not continue_:
                continue
            handles.append(reg(hook_for(logs["conv"])))
            break
        m = model[int(where)]
        reg = {"forward": m.register_forward_hook, "pre": m.register_forward_pre_hook,
               "backward": m.register_full_backward_hook}[kind]
        handles.append(reg(hook_for(logs[label])))
    try:
        assert ("conv_bn_act", 0, 2) not in _fused(conv)
        if where == "global":
            for model, label in ((orig, "orig"), (conv, "conv")):
                logs["conv"].clear()
                model(x).square().sum().backward()
                logs[label] = list(logs["conv"])
        else:
            orig(x).square().sum().backward()
            conv(x).square().sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert len(logs["conv"]) == len(logs["orig"]) > 0
    for a, b in zip(logs["conv"], logs["orig"]):
        assert_close(a, b, torch.float64, f"{kind} hook tensor")
    # removing the hooks brings the fusion back
    assert ("conv_bn_act", 0, 2) in _fused(conv)


def _dcgan(seed, nz, ngf):
    """The DCGAN generator of genfast.models in float64, BatchNorm state randomised."""
    torch.manual_seed(seed)
    model = models.DCGANGenerator(nz=nz, ngf=ngf)
    _randomise_bn(model)
    return model.double()


def test_sync_batchnorm_convert_after_genfast_convert_computes_the_unfused_model():
    # nn.SyncBatchNorm.convert_sync_batchnorm replaces the BatchNorms genfast fused: the
    # converted model must compute exactly what the unconverted one does (it was 0.338 off).
    orig = _dcgan(3, 8, 4)
    conv = nn.SyncBatchNorm.convert_sync_batchnorm(genfast.convert(copy.deepcopy(orig)))
    assert sum(type(m) is nn.SyncBatchNorm for m in conv.modules()) == 4
    assert _fused(conv.main) == [("conv_act", 12, 13)]
    _assert_same_training(orig, conv, (torch.randn(3, 8, dtype=torch.float64),))


def test_readme_ddp_recipe_without_fuse_conv_bn_false():
    orig = _dcgan(4, 8, 4)
    conv = gnn.SyncBatchNormAct2d.convert_sync_batchnorm(genfast.convert(copy.deepcopy(orig)))
    syncs = [m for m in conv.modules() if type(m) is gnn.SyncBatchNormAct2d]
    assert len(syncs) == 4 and all(m.activation == "relu" for m in syncs)
    assert not any(type(m) is nn.SyncBatchNorm for m in conv.modules())
    # no process group: local statistics, exactly the unconverted model
    _assert_same_training(orig, conv, (torch.randn(3, 8, dtype=torch.float64),))


def test_conv_transpose_bn_act_block_stands_down():
    torch.manual_seed(5)
    block = gnn.ConvTransposeBNAct2d(4, 3, 4, 2, 1, activation="leaky_relu", negative_slope=0.2).double()
    _randomise_bn(block)
    plain = nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3), nn.LeakyReLU(0.2)).double()
    plain.load_state_dict(block.state_dict(), strict=False)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for train in (True, False):
        block.train(train), plain.train(train)
        assert_close(block(x), plain(x), torch.float64, "fused block")
    # replace the BatchNorm by a SyncBatchNorm, hook the conv: the block runs its children
    block = nn.SyncBatchNorm.convert_sync_batchnorm(block)
    assert type(block[1]) is nn.SyncBatchNorm
    seen, seen_plain = [], []
    block[0].register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    plain[0].register_forward_hook(lambda m, a, out: seen_plain.append(out.detach().clone()))
    for train in (True, False):
        block.train(train), plain.train(train)
        assert_close(block(x), plain(x), torch.float64, "unfused block")
    for a, b in zip(seen, seen_plain):
        assert_close(a, b, torch.float64, "conv hook")
    assert len(seen) == 2
    assert_close(block[1].running_mean, plain[1].running_mean, torch.float64, "running_mean")


def _ddp_recipe_worker(rank, port, out_dir, world, per_rank):
    import os

    import torch.distributed as dist
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _dcgan(7, 6, 2)
        # the README's recipe, as written (on CPU: no .cuda(rank), no device_ids)
        model = genfast.convert(model)
        model = gnn.SyncBatchNormAct2d.convert_sync_batchnorm(model)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        z = torch.randn(world * per_rank, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        out = ddp(z[rank * per_rank:(rank + 1) * per_rank])
        # DDP averages the ranks' gradients: with equal batches, the mean of the local means'
        # gradients is the gradient of the global mean
        out.square().mean().backward()
        opt.step()
        torch.save({"out": out.detach(), "types": [type(m).__name__ for m in model.modules()],
                    "state": {k: v.clone() for k, v in model.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_readme_ddp_recipe_synchronises_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world, per_rank = 2, 3
    mp.spawn(_ddp_recipe_worker, args=(port, str(tmp_path), world, per_rank), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    # one process, the unconverted model, the whole batch: what the synchronised ranks compute
    ref = _dcgan(7, 6, 2)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    z = torch.randn(world * per_rank, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = ref(z)
    out.square().mean().backward()
    opt.step()
    for r, res_r in enumerate(res):
        assert res_r["types"].count("SyncBatchNormAct2d") == 4
        assert_close(res_r["out"], out[r * per_rank:(r + 1) * per_rank].detach(), torch.float64, "DDP output")
        assert list(res_r["state"]) == list(ref.state_dict())
        for k, v in ref.state_dict().items():
            assert_close(res_r["state"][k].double(), v.double(), torch.float64, f"DDP state {k}")


def test_planned_fusions_really_run_fused(monkeypatch):
    import genfast.nn.fused_sequential as fs
    calls = []
    for name in ("conv_bn_act_forward", "batch_norm_act_forward", "conv_transpose_act_forward"):
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    G = genfast.convert(_dcgan(8, 6, 2))
    G(torch.randn(2, 6, dtype=torch.float64))
    assert calls == ["conv_bn_act_forward"] * 4 + ["conv_transpose_act_forward"]
    calls.clear()
    h = G.main[4].register_forward_pre_hook(lambda m, args: None)
    G(torch.randn(2, 6, dtype=torch.float64))
    assert calls == ["conv_bn_act_forward"] * 3 + ["conv_transpose_act_forward"]
    h.remove()
    calls.clear()
    G(torch.randn(2, 6, dtype=torch.float64))
    assert calls == ["conv_bn_act_forward"] * 4 + ["conv_transpose_act_forward"]


def _fused_ops_ran(model, *inputs):
    """Run ``model`` under the profiler: (output, whether genfast's fused BatchNorm + activation ran,
    whether torch's batch_norm ran)."""
    from torch.profiler import profile
    with profile() as prof:
        y = model(*inputs)
    names = {e.name for e in prof.events()}
    return y, any(n.startswith("genfast::batch_norm_act") for n in names), "aten::batch_norm" in names


@pytest.mark.parametrize("how", ["pickled", "plan_alone"])
def test_fused_sequential_after_unpickling(how):
    """A converted model pickled and loaded runs its plan fused; so does a container holding its
    plan alone (as one pickled by a genfast from before the forward's step index): the index is
    built at the first forward. Same output as the torch model (training mode)."""
    import pickle

    torch.manual_seed(0)
    ref = models.MLPGenerator()
    conv = genfast.convert(copy.deepcopy(ref))
    if how == "pickled":
        conv = pickle.loads(pickle.dumps(conv))
    else:
        del conv.main.__dict__["_genfast_steps"]
    z = torch.randn(8, 100)
    y, fused, unfused = _fused_ops_ran(conv, z)
    assert fused and not unfused
    assert_close(y, ref(z))


def _traced_targets(model, *inputs):
    """Compile ``model`` (fullgraph) with a dynamo backend that records the traced graph and runs
    it as traced: (output, the graph's call targets as strings)."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(model, backend=record, fullgraph=True)(*inputs)
    return out, [str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"]


def _eval_generator(name):
    torch.manual_seed(0)
    g = (models.MLPGenerator(nz=16, out_dim=48, hidden=(32, 64)) if name == "mlp"
         else models.KerasDCGANGenerator(nz=16, nc=1, width=16))
    _randomise_bn(g)
    return g.eval()


@pytest.mark.parametrize("name", ["mlp", "keras"])
def test_compiled_eval_generator_on_cpu_traces_torch_blocks(name):
    """torch.compile of a converted generator sampling on the CPU (eval, no_grad): the product ->
    BatchNorm -> activation blocks trace as torch's functions, which inductor fuses, with no fold
    of the BatchNorm into the weight (no rsqrt in the graph: the fold re-read and re-wrote every
    weight per call); the only genfast op left is the transposed convolution's C++ op
    (genfast::conv_transpose2d_act, called without Python), not the registered Python op. The
    output matches torch's float64 model."""
    ref = _eval_generator(name)
    conv = genfast.convert(copy.deepcopy(ref)).eval()
    z = torch.randn(3, 16)
    with torch.no_grad():
        out, targets = _traced_targets(conv, z)
        want = copy.deepcopy(ref).double()(z.double())
    assert not any("rsqrt" in t for t in targets), targets
    ours = [t for t in targets if "genfast" in t]
    if name == "mlp":
        assert ours == [], ours
    else:
        assert ours and set(ours) == {"genfast.conv_transpose2d_act.default"}, ours
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_compiled_eval_generator_on_cpu_inductor():
    """The same through inductor (the default backend): output as torch's float64 model."""
    ref = _eval_generator("keras")
    conv = genfast.convert(copy.deepcopy(ref)).eval()
    z = torch.randn(2, 16)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(conv)(z)
        want = copy.deepcopy(ref).double()(z.double())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# genfast's ops defined with a C++ kernel and C++ autograd (csrc/ops.cpp), which a compiled
# graph calls without Python
_CPP_OPS = {"genfast.conv_transpose2d_act.default", "genfast.batch_norm_act_train.default",
            "genfast.gan_loss_train.default"}


def test_compiled_training_step_on_cpu_calls_the_cpp_ops():
    """torch.compile(fullgraph) of a converted Keras DCGAN's generator step on the CPU, training
    mode (Linear -> BatchNorm1d -> LeakyReLU, ConvTranspose2d -> BatchNorm2d -> LeakyReLU blocks,
    the discriminator's Conv2d -> BatchNorm2d -> LeakyReLU, genfast's GAN loss): the traced graph
    calls only genfast's C++ ops (their autograd traced by AOTAutograd), no registered Python op,
    and the loss, every gradient and the running statistics match the eager converted models."""
    import genfast.functional as GF

    torch.manual_seed(0)
    G = genfast.convert(models.KerasDCGANGenerator(nz=16, nc=1, width=16))
    D = genfast.convert(models.KerasDCGANDiscriminator(nc=1))
    Gc, Dc = copy.deepcopy(G), copy.deepcopy(D)
    z = torch.randn(4, 16)

    def step(G, D, z):
        return GF.generator_loss(D(G(z)), kind="bce")

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    torch._dynamo.reset()
    loss_c = torch.compile(step, backend=record, fullgraph=True)(Gc, Dc, z)
    loss_c.backward()
    loss = step(G, D, z)
    loss.backward()
    targets = {str(n.target) for gm in graphs for n in gm.graph.nodes if n.op == "call_function"}
    ours = {t for t in targets if "genfast" in t}
    assert ours == _CPP_OPS, ours
    torch.testing.assert_close(loss_c, loss)
    # (a convolution's bias before a BatchNorm has a zero gradient up to rounding: compared at
    # the scale of all gradients)
    scale = max(float(p.grad.abs().max()) for p in list(G.parameters()) + list(D.parameters()))
    for (name, a), b in zip(list(Gc.named_parameters()) + list(Dc.named_parameters()),
                            list(G.parameters()) + list(D.parameters())):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m: f"{name}: {m}")
    for (name, a), b in zip(list(Gc.named_buffers()) + list(Dc.named_buffers()),
                            list(G.buffers()) + list(D.buffers())):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("name", ["mlp_d", "mlp_g", "keras_d_eval"])
def test_compiled_linear_blocks_on_cpu_trace_as_the_torch_model(name):
    """Traced by torch.compile on the CPU, a converted model made of Linear -> activation and
    Linear -> BatchNorm1d -> activation (or, in eval under no_grad, Conv2d -> activation and
    Conv2d -> BatchNorm2d -> activation) runs its children as they are: the traced graph calls the
    same functions as the torch model's (in-place activations included, which inductor fuses
    better: the fused path's out-of-place LeakyReLU made the compiled MLP discriminator 20%
    slower), and the output matches."""
    torch.manual_seed(0)
    if name == "keras_d_eval":  # Conv2d -> activation and Conv2d -> BatchNorm2d (eval) -> act
        ref = models.KerasDCGANDiscriminator(nc=1)
        _randomise_bn(ref)
        ref.eval()
        x = torch.randn(4, 1, 28, 28)
    else:
        ref = models.MLPDiscriminator() if name == "mlp_d" else models.MLPGenerator()
        x = torch.randn(8, 784) if name == "mlp_d" else torch.randn(8, 100)
    conv = genfast.convert(copy.deepcopy(ref))

    def calls(model):
        with torch.no_grad() if name == "keras_d_eval" else contextlib.nullcontext():
            out, targets = _traced_targets(model, x)
        return out, [t for t in targets if "getattr" not in t]

    (out_ref, want), (out, got) = calls(ref), calls(conv)
    assert got == want
    torch.testing.assert_close(out, out_ref)


@pytest.mark.parametrize("block", ["convt_bn_relu", "conv_bn_leaky", "linear_leaky", "bn_relu"])
@pytest.mark.parametrize("train", [True, False])
def test_non_tensor_input_raises_torchs_type_error(block, train):
    """A list (or any non-tensor) fed to a fused run raises what the torch model raises (a
    TypeError from the first child), not an AttributeError from inside genfast."""
    make = {"convt_bn_relu": lambda: nn.Sequential(nn.ConvTranspose2d(4, 3, 4, 2, 1), nn.BatchNorm2d(3),
                                                   nn.ReLU()),
            "conv_bn_leaky": lambda: nn.Sequential(nn.Conv2d(4, 3, 3, 2, 1), nn.BatchNorm2d(3),
                                                   nn.LeakyReLU(0.2, True)),
            "linear_leaky": lambda: nn.Sequential(nn.Linear(4, 3), nn.LeakyReLU(0.2)),
            "bn_relu": lambda: nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())}[block]
    ref = make().train(train)
    fused = genfast.convert(copy.deepcopy(ref)).train(train)
    assert isinstance(fused, gnn.FusedSequential)
    for bad in ([[1.0, 2.0]], None, 3.0):
        with pytest.raises(Exception) as want:
            ref(bad)
        with pytest.raises(type(want.value)):
            fused(bad)
