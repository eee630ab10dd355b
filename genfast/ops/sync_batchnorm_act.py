"""SyncBatchNormAct: BatchNorm + activation with statistics over every rank of a
torch.distributed process group (any backend: NCCL on GPUs, gloo on CPU).

Forward: local (count, mean, M2) per channel (one fused pass) -> one all_gather -> Chan's merge of
the gathered (ranks, 2C+1) matrix with tensor ops (uneven per-rank batches are exact, every rank
gets the same result, and nothing synchronises with the host, so the layer can be captured in a
CUDA graph) -> normalise + activation (one fused pass). Backward: local (sum dz, sum dz*xhat) (one fused pass)
-> one all_reduce -> grad_input (one fused pass). grad_weight / grad_bias stay local, as in
nn.SyncBatchNorm (DDP averages parameter gradients).

The split passes run as the genfast::batch_norm_act_{stats,apply,bwd_reduce,bwd_dx} C++ ops: the
CPU kernels on CPU tensors (cpu backend), the CUDA kernels on CUDA tensors when genfast._C was
built with them (whatever fused backend, cuda or triton, the single-process layer uses: there
are no Triton kernels for the split passes). The reference formulas run them under the reference
backend, on CUDA tensors without the CUDA extension (with a warning, once), and on CPU tensors
under any backend but cpu (auto picks cpu when the C++ extension is built)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from genfast import backend as B
from genfast.reference import batchnorm_act as ref

_ACT_NAMES = {v: k for k, v in B.ACTIVATIONS.items()}


def _use_cpp(t: torch.Tensor) -> bool:
    name = B.resolve("batchnorm_act", t.device)
    if name == "reference":
        return False
    if t.device.type == "cuda":
        if not B.has_cuda_ext():
            B.warn_once("sync-batchnorm-act-cuda",
                        "genfast: SyncBatchNormAct2d runs its passes through the reference formulas on "
                        "CUDA tensors: genfast._C was built without CUDA kernels")
            return False
        return True
    return name == "cpu"


def _fake_registrations():
    if not B.has_cpu_ext():
        return
    lib = torch.library.Library("genfast", "FRAGMENT")

    def acc(t):
        return ref.acc_dtype(t.dtype)

    torch.library.register_fake(
        "genfast::batch_norm_act_stats",
        lambda x: (x.new_empty(x.shape[1], dtype=acc(x)), x.new_empty(x.shape[1], dtype=acc(x))), lib=lib)
    torch.library.register_fake(
        "genfast::batch_norm_act_apply", lambda x, *args: ref.empty_bn_output(x), lib=lib)
    torch.library.register_fake(
        "genfast::batch_norm_act_bwd_reduce",
        lambda dy, s, *args: (s.new_empty(s.shape[1], dtype=acc(s)), s.new_empty(s.shape[1], dtype=acc(s))),
        lib=lib)
    torch.library.register_fake(
        "genfast::batch_norm_act_bwd_dx",
        lambda dy, s, *args: ref.bn_output_as_torch(ref.bn_write_buffer(s)), lib=lib)
    return lib


_LIB = _fake_registrations()


def local_stats(x):
    if _use_cpp(x):
        return torch.ops.genfast.batch_norm_act_stats(x)
    return ref.stats(x)


def merge_stats(counts, means, m2s):
    """Chan's merge of per-rank (count, mean, M2) rows -> (count, mean, M2), as tensor ops on the
    whole (ranks, C) matrix: no host synchronisation and a fixed number of launches whatever the
    world size. Rows with count 0 contribute nothing. The reductions run over the rank dimension
    of the same gathered matrix on every rank, so every rank gets the same bits."""
    n_i = counts.unsqueeze(1)
    present = n_i > 0
    n = counts.sum()
    mean = torch.where(present, means * n_i, 0).sum(0) / n.clamp_min(1)
    d = torch.where(present, means - mean, 0)
    m2 = torch.where(present, m2s, 0).sum(0) + (n_i * d * d).sum(0)
    return n, mean, m2


class SyncBatchNormActFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, process_group,
                world_size, activation, negative_slope):
        C = x.shape[1]
        count = x.numel() // C if C else 0
        mean_l, m2_l = local_stats(x)
        acc = mean_l.dtype
        packed = torch.cat([mean_l.new_full((1,), float(count)), mean_l, m2_l])
        gathered = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(gathered, packed, group=process_group)
        rows = torch.stack(gathered)
        n, mean, m2 = merge_stats(rows[:, 0], rows[:, 1:C + 1], rows[:, C + 1:])
        # The global count stays on the device (reading it would synchronise with the host), so
        # a global batch of one value per channel is not rejected here, as in nn.SyncBatchNorm.
        var = m2 / n
        invstd = torch.rsqrt(var + eps)
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_((1 - momentum) * running_mean.to(acc) + momentum * mean)
                running_var.copy_((1 - momentum) * running_var.to(acc) + momentum * (m2 / (n - 1)))
        act = B.ACTIVATIONS[activation]
        if _use_cpp(x):
            y = torch.ops.genfast.batch_norm_act_apply(x, mean, invstd, weight, bias, act, negative_slope, 0.0)
        else:
            y = ref.apply(x, mean, invstd, weight, bias, activation, negative_slope)
        ctx.save_for_backward(x, weight, bias, mean, invstd, n)
        ctx.cfg = (process_group, activation, negative_slope)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, bias, mean, invstd, n = ctx.saved_tensors
        group, activation, slope = ctx.cfg
        if torch.is_grad_enabled():
            raise RuntimeError("SyncBatchNormAct2d: double backward is not supported")
        grad_out = grad_out.contiguous() if not grad_out.is_contiguous() and x.is_contiguous() else grad_out
        act = B.ACTIVATIONS[activation]
        cpp = _use_cpp(x)
        if cpp:
            s, sx = torch.ops.genfast.batch_norm_act_bwd_reduce(grad_out, x, weight, bias, mean, invstd, act,
                                                                slope, 0.0, False)
        else:
            s, sx = ref.bwd_reduce(grad_out, x, weight, bias, mean, invstd, activation, slope)
        # local parameter gradients (DDP averages them), global sums for grad_input
        dw = sx.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = s.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        both = torch.cat([s, sx])
        dist.all_reduce(both, group=group)
        C = x.shape[1]
        # The means of the global sums, divided on the device; the dx pass then divides by 1.
        both = both / n.clamp_min(1)
        gs, gsx = both[:C], both[C:]
        dx = None
        if ctx.needs_input_grad[0]:
            if cpp:
                dx = torch.ops.genfast.batch_norm_act_bwd_dx(grad_out, x, weight, bias, mean, invstd, gs, gsx,
                                                             1.0, act, slope, 0.0, False)
            else:
                dx = ref.bwd_dx(grad_out, x, weight, bias, mean, invstd, gs, gsx, 1.0, activation, slope)
        return dx, dw, db, None, None, None, None, None, None, None, None
