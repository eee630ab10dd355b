"""genfast.convert: what it swaps, what it leaves, and that converted models train exactly like
the originals (outputs, gradients, optimiser steps, state_dict both ways)."""
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
    assert _fused(conv) == [("bn_act", 1, 2), ("bn_act", 4, 5)]
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
