"""SyncBatchNormAct2d over torch.distributed (gloo, 2 processes on CPU): same outputs,
gradients and running statistics as one process over the concatenated batch, with uneven
per-rank batches; a DDP step of a genfast.convert-ed model matches the unconverted DDP step."""
import contextlib
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import genfast
import genfast.nn as gnn
from genfast import models
from tests.utils import assert_close

WORLD = 2
SPLIT = [3, 6]  # uneven per-rank batches


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(SPLIT), 4, 3, 5, dtype=torch.float64, generator=g) * 2 + 0.5
    dy = torch.randn(x.shape, dtype=torch.float64, generator=g)
    return x, dy


def _make_sync():
    m = gnn.SyncBatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, dtype=torch.float64)
    with torch.no_grad():
        m.weight.copy_(torch.linspace(0.5, 1.5, 4))
        m.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    return m


def _ddp_pair():
    """An unconverted model and its genfast.convert-ed copy (DDP on CPU takes no
    nn.SyncBatchNorm, so these keep per-rank statistics)."""
    torch.manual_seed(3)
    plain = models.DCGANGenerator(nz=6, ngf=2).double()
    return plain, genfast.convert(copy.deepcopy(plain))


def _worker(rank, port, out_dir, backend_name):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        with genfast.backend.use_backend(backend_name):
            x, dy = _data()
            lo = sum(SPLIT[:rank])
            hi = lo + SPLIT[rank]
            m = _make_sync()
            xs = x[lo:hi].clone().requires_grad_()
            for _ in range(2):
                y = m(xs)
            y.backward(dy[lo:hi])
            result = {"y": y.detach(), "dx": xs.grad, "dw": m.weight.grad, "db": m.bias.grad,
                      "rm": m.running_mean, "rv": m.running_var, "nbt": m.num_batches_tracked}
            # DDP: converted vs unconverted, one SGD step each
            steps = {}
            pair = _ddp_pair()
            result["types"] = [type(mm).__name__ for mm in pair[1].modules()]
            for name, model in zip(("plain", "fused"), pair):
                ddp = nn.parallel.DistributedDataParallel(model)
                opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
                z = torch.randn(SPLIT[rank] + 2, 6, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(rank))
                out = ddp(z)
                out.square().mean().backward()
                opt.step()
                steps[name] = {"out": out.detach(), "state": {k: v.clone() for k, v in model.state_dict().items()}}
            result["ddp"] = steps
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend_name", ["cpu", "reference"])
def test_sync_matches_single_process_over_concatenated_batch(tmp_path, backend_name):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path), backend_name), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, dy = _data()
    # the single-process answer, from torch.nn
    ref_m = nn.BatchNorm2d(4, dtype=torch.float64)
    with torch.no_grad():
        ref_m.weight.copy_(torch.linspace(0.5, 1.5, 4))
        ref_m.bias.copy_(torch.linspace(-0.3, 0.3, 4))
    xr = x.clone().requires_grad_()
    for _ in range(2):
        yr = F.leaky_relu(ref_m(xr), 0.2)
    yr.backward(dy)
    assert_close(torch.cat([r["y"] for r in res]), yr, torch.float64, "output")
    assert_close(torch.cat([r["dx"] for r in res]), xr.grad, torch.float64, "grad_input")
    assert_close(res[0]["dw"] + res[1]["dw"], ref_m.weight.grad, torch.float64, "grad_weight (sum of local)")
    assert_close(res[0]["db"] + res[1]["db"], ref_m.bias.grad, torch.float64, "grad_bias (sum of local)")
    for r in res:
        assert_close(r["rm"], ref_m.running_mean, torch.float64, "running_mean")
        assert_close(r["rv"], ref_m.running_var, torch.float64, "running_var")
        assert int(r["nbt"]) == 2
    # DDP step: converted model == unconverted, on every rank
    for r in res:
        assert "FusedSequential" in r["types"] and "ConvTranspose2d" in r["types"]
        assert_close(r["ddp"]["fused"]["out"], r["ddp"]["plain"]["out"], torch.float64, "DDP output")
        for k, v in r["ddp"]["plain"]["state"].items():
            assert_close(r["ddp"]["fused"]["state"][k].double(), v.double(), torch.float64, f"DDP state {k}")


def test_single_process_falls_back_to_local_statistics():
    m = _make_sync()
    b = gnn.BatchNormAct2d(4, negative_slope=0.2, dtype=torch.float64)
    b.load_state_dict(m.state_dict())
    x = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    assert_close(m(x), b(x), torch.float64, "no process group")
    assert_close(m.running_var, b.running_var, torch.float64, "running_var")


@contextlib.contextmanager
def _no_host_reads():
    """Every Python-level read of a tensor's value on the host (item, float, int, bool, index,
    tolist, numpy) raises inside the block."""
    names = ["item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise AssertionError(f"host read of a tensor value: Tensor.{name}")
        return raiser

    for n in names:
        setattr(torch.Tensor, n, forbid(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


def test_merge_stats_is_chan_over_ranks_without_host_reads():
    from genfast.ops.sync_batchnorm_act import merge_stats

    g = torch.Generator().manual_seed(5)
    parts = [torch.randn(n, 3, dtype=torch.float64, generator=g) * 3 + 2 for n in (4, 0, 7, 1)]
    counts = torch.tensor([float(p.shape[0]) for p in parts], dtype=torch.float64)
    # an empty rank sends (0, 0, 0), as local_stats does; its row must not move the result
    means = torch.stack([p.mean(0) if len(p) else torch.zeros(3, dtype=torch.float64) for p in parts])
    m2s = torch.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else torch.zeros(3, dtype=torch.float64)
                       for p in parts])
    with _no_host_reads():
        n, mean, m2 = merge_stats(counts, means, m2s)
    allx = torch.cat(parts)
    assert n.dim() == 0 and n.tolist() == 12.0
    assert_close(mean, allx.mean(0), torch.float64, "merged mean")
    assert_close(m2, ((allx - allx.mean(0)) ** 2).sum(0), torch.float64, "merged M2")
    # NaN in a rank's statistics propagates (torch's SyncBatchNorm gives NaN too)
    means[2, 1] = float("nan")
    n, mean, m2 = merge_stats(counts, means, m2s)
    assert torch.isnan(mean[1]) and torch.isnan(m2[1]) and not torch.isnan(mean[[0, 2]]).any()


def test_sync_function_forward_backward_make_no_host_reads(tmp_path):
    """The synchronised Function (gloo, world size 1 in this process; the 2-process test above
    checks the numbers over ranks) reads no tensor value on the host in forward or backward."""
    from genfast.ops.sync_batchnorm_act import SyncBatchNormActFunction

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        m = _make_sync()
        r = gnn.BatchNormAct2d(4, negative_slope=0.2, dtype=torch.float64)
        r.load_state_dict(m.state_dict())
        x, dy = _data()
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        with _no_host_reads():
            y = SyncBatchNormActFunction.apply(xs, m.weight, m.bias, m.running_mean, m.running_var, m.eps,
                                               0.1, dist.group.WORLD, 1, "leaky_relu", 0.2)
            y.backward(dy)
        yr = r(xr)
        yr.backward(dy)
        assert_close(y, yr, torch.float64, "output")
        assert_close(xs.grad, xr.grad, torch.float64, "grad_input")
        assert_close(m.weight.grad, r.weight.grad, torch.float64, "grad_weight")
        assert_close(m.running_var, r.running_var, torch.float64, "running_var")
    finally:
        dist.destroy_process_group()


def test_convert_sync_batchnorm_keeps_activation_and_tensors():
    seq = nn.Sequential(gnn.BatchNormAct2d(3, activation="relu"), nn.BatchNorm2d(3))
    w = seq[0].weight
    out = gnn.SyncBatchNormAct2d.convert_sync_batchnorm(seq)
    assert type(out[0]) is gnn.SyncBatchNormAct2d and out[0].activation == "relu" and out[0].weight is w
    assert type(out[1]) is nn.SyncBatchNorm and not isinstance(out[0], nn.SyncBatchNorm)
    assert list(out.state_dict()) == list(seq.state_dict())
    with pytest.raises(ValueError, match="memory_efficient"):
        gnn.SyncBatchNormAct2d.convert_sync_batchnorm(gnn.BatchNormAct2d(3, memory_efficient=True))


@pytest.mark.parametrize("short_rows", [False, True], ids=["channels_last", "short_rows"])
def test_split_pass_ops_match_reference_and_opcheck(short_rows):
    """The four split-pass ops on the CPU, channels-last and on short NCL rows (6 values, read
    as virtual channels), against the float64 reference; opcheck."""
    from genfast.reference import batchnorm_act as ref

    x = (torch.randn(5, 4, 2, 3, dtype=torch.float64) if short_rows
         else torch.randn(3, 4, 5, 2, dtype=torch.float64).to(memory_format=torch.channels_last))
    w, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    dy = torch.randn_like(x)
    mean, m2 = torch.ops.genfast.batch_norm_act_stats(x)
    rmean, rm2 = ref.stats(x)
    assert_close(mean, rmean, torch.float64, "mean")
    assert_close(m2, rm2, torch.float64, "M2")
    invstd = torch.rsqrt(m2 / 30 + 1e-5)
    y = torch.ops.genfast.batch_norm_act_apply(x, mean, invstd, w, b, 2, 0.2, 0.0)
    assert_close(y, ref.apply(x, mean, invstd, w, b, "leaky_relu", 0.2), torch.float64, "apply")
    s, sx = torch.ops.genfast.batch_norm_act_bwd_reduce(dy, x, w, b, mean, invstd, 2, 0.2, 0.0, False)
    rs, rsx = ref.bwd_reduce(dy, x, w, b, mean, invstd, "leaky_relu", 0.2)
    assert_close(s, rs, torch.float64, "sum dz")
    assert_close(sx, rsx, torch.float64, "sum dz xhat")
    dx = torch.ops.genfast.batch_norm_act_bwd_dx(dy, x, w, b, mean, invstd, s, sx, 30.0, 2, 0.2, 0.0, False)
    assert_close(dx, ref.bwd_dx(dy, x, w, b, mean, invstd, s, sx, 30.0, "leaky_relu", 0.2), torch.float64, "dx")
    torch.library.opcheck(torch.ops.genfast.batch_norm_act_stats.default, (x,))
    torch.library.opcheck(torch.ops.genfast.batch_norm_act_apply.default, (x, mean, invstd, w, b, 2, 0.2, 0.0))
    torch.library.opcheck(torch.ops.genfast.batch_norm_act_bwd_reduce.default,
                          (dy, x, w, b, mean, invstd, 2, 0.2, 0.0, False))
    torch.library.opcheck(torch.ops.genfast.batch_norm_act_bwd_dx.default,
                          (dy, x, w, b, mean, invstd, s, sx, 30.0, 2, 0.2, 0.0, False))


@pytest.mark.gpu
def test_nccl_collectives_world_size_one(cuda_device, tmp_path):
    """The synchronised path itself (all_gather + all_reduce over NCCL) on one GPU: the module
    skips synchronisation at world size 1, so the Function is called directly."""
    from genfast.ops.sync_batchnorm_act import SyncBatchNormActFunction

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    try:
        x = (torch.randn(6, 4, 5, 5, device=cuda_device) * 2 + 1).requires_grad_()
        m = gnn.SyncBatchNormAct2d(4, negative_slope=0.2, device=cuda_device)
        r = gnn.BatchNormAct2d(4, negative_slope=0.2, device=cuda_device)
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
        r.load_state_dict(m.state_dict())
        dy = torch.randn_like(x)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # the synchronised path never waits for the GPU
        try:
            y = SyncBatchNormActFunction.apply(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps, 0.1,
                                               dist.group.WORLD, 1, "leaky_relu", 0.2)
            y.backward(dy)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        xr = x.detach().clone().requires_grad_()
        yr = r(xr)
        yr.backward(dy)
        assert_close(y, yr, torch.float32, "output")
        assert_close(x.grad, xr.grad, torch.float32, "grad_input")
        assert_close(m.weight.grad, r.weight.grad, torch.float32, "grad_weight", scale=10)
        assert_close(m.running_var, r.running_var, torch.float32, "running_var")
    finally:
        dist.destroy_process_group()
