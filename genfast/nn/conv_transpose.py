"""ConvTranspose2d: nn.ConvTranspose2d with the bias and an activation fused into one op."""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import nn
from torch.nn.modules import module as _m

from genfast import backend as B
from genfast import functional as GF
from genfast.nn.batchnorm_act import batch_norm_act_forward
from genfast.ops import conv_transpose as _ct
from genfast.ops.conv_transpose import apply_activation
from genfast.ops.conv_act import _act_eager


class ConvTranspose2d(nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` followed by an optional activation, fused (bias and activation in
    the kernel's epilogue). Input (N, C_in, H, W) or unbatched (C_in, H, W).

    Constructor arguments, defaults, parameters and state_dict keys are nn.ConvTranspose2d's
    (in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
    bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None), plus keyword-only
    ``activation`` (None = identity, "relu", "leaky_relu", "tanh", "sigmoid") and
    ``negative_slope`` (0.01, leaky_relu only, >= 0). ``forward(input, output_size=None)``
    accepts ``output_size`` as nn.ConvTranspose2d does. An activation's backward reads the
    output, as after nn.LeakyReLU(inplace=True): modify the output in place only after the
    backward (without an activation the output is not saved).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, output_padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | tuple[int, int] = 1, padding_mode: Literal["zeros", "reflect", "replicate", "circular"] = "zeros",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, *, activation: Optional[str] = None,
                 negative_slope: float = 0.01) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                         groups, bias, dilation, padding_mode, device, dtype)
        _ct.check_activation(activation, negative_slope)
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
            if self.activation == "leaky_relu":
                s += f", negative_slope={self.negative_slope}"
        return s

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        return conv_transpose_act_forward(self, input, self.activation, self.negative_slope,
                                          output_size)


def conv_transpose_act_forward(conv: nn.ConvTranspose2d, input: torch.Tensor,
                               activation: Optional[str], negative_slope: float = 0.01,
                               output_size: Optional[list[int]] = None) -> torch.Tensor:
    """activation(conv(input)) with ``conv``'s weight, bias and geometry, the activation in the
    convolution's epilogue (``conv`` is any nn.ConvTranspose2d; its own activation is ignored)."""
    if B.eager_cpu(input):
        act = _ct.check_activation(activation, negative_slope)
        _ct.check_slope_range(act, negative_slope, input)
        if output_size is None and conv.padding_mode == "zeros":
            # genfast::conv_transpose2d_act (C++ autograd; torch's own op for arguments its
            # kernel does not take, so torch's checks and exceptions)
            return _ct.conv_transpose_eager(input, conv.weight, conv.bias, conv.stride, conv.padding,
                                            conv.output_padding, conv.groups, conv.dilation, act,
                                            negative_slope)
        # torch's transposed convolution (bias included; its checks), then torch's activation
        # in place on its output.
        y = nn.ConvTranspose2d.forward(conv, input, output_size)
        return _act_eager(y, act, negative_slope)
    if conv.padding_mode != "zeros":
        raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
    output_padding = conv._output_padding(input, output_size, conv.stride, conv.padding,
                                          conv.kernel_size, 2, conv.dilation)
    return GF.conv_transpose2d(input, conv.weight, conv.bias, conv.stride, conv.padding,
                               output_padding, conv.groups, conv.dilation,
                               activation=activation, negative_slope=negative_slope)


def bn_foldable(bn: nn.modules.batchnorm._BatchNorm, weight: torch.Tensor, input: object,
                dim: int) -> bool:
    """Whether an eval-mode BatchNorm may be folded into the product before it: the input has the
    rank the BatchNorm takes after the product (``dim``), and the BatchNorm's parameters and
    running statistics have the product weight's dtype (torch's CPU batch_norm rejects a mix,
    which a fold would hide)."""
    if not isinstance(input, torch.Tensor) or input.dim() != dim:
        return False
    return all(t is None or t.dtype == weight.dtype
               for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var))


def fold_pays(input: torch.Tensor, weight: torch.Tensor, activation: Optional[str], out_channels: int,
              stride: tuple = (1, 1), transposed: bool = False, channel_dim: int = 1) -> bool:
    """Whether an eval-mode BatchNorm is folded into the product's weight for this call. On the
    eager CPU path the fold runs about eight small tensor ops and reads and writes the weight on
    every call, where the unfolded block pays one fused BatchNorm + activation pass over the
    output: interleaved on the CI CPU, the folded MLP generator sampled at 0.53x torch (batch 1)
    to 0.85x (batch 64), the Keras DCGAN generator and discriminator at 0.76x (batch 1). So there
    the fold runs only when the output is more than twice the weight and 64K values larger (and
    for activations the fused BatchNorm does not take: tanh, sigmoid); elsewhere (CUDA, traced
    calls) it always runs (torch.compile's CPU graphs do not reach it: B.inductor_cpu)."""
    if not B.eager_cpu(input) or activation not in (None, "identity", "relu", "leaky_relu"):
        return True
    # the output's size from the input's: out_channels per position, the positions scaled by the
    # stride (up for a transposed convolution, down for a convolution; padding ignored)
    s = 1
    for v in stride:
        s *= v
    per = input.numel() // max(1, input.shape[channel_dim]) * out_channels
    out_numel = per * s if transposed else per // s
    return out_numel > 2 * weight.numel() + 65536


def bn_eval_act(bn: nn.modules.batchnorm._BatchNorm, y: torch.Tensor, activation: str,
                negative_slope: float, keep_input: bool) -> torch.Tensor:
    """The unfolded eval block's tail: genfast's fused eval BatchNorm + activation on the product
    ``y`` (running statistics: one pass); after an nn.LeakyReLU(inplace=False) (``keep_input``)
    the BatchNorm alone, then torch's LeakyReLU out of place."""
    if keep_input and activation == "leaky_relu":
        return apply_activation(batch_norm_act_forward(bn, y, "identity", 0.01), activation,
                                negative_slope)
    return batch_norm_act_forward(bn, y, activation, negative_slope)


def product_bn_eval_fast(m: nn.Module, bn: nn.modules.batchnorm._BatchNorm, activation: Optional[str],
                          negative_slope: float, input: torch.Tensor) -> Optional[torch.Tensor]:
    """The eval block for an eager CPU call that records no backward (sampling under no_grad or
    inference_mode): genfast._C.product_bn_eval_eager, the product with its bias (torch's linear or
    conv2d, genfast's transposed convolution for an nn.ConvTranspose2d ``m``), then the
    BatchNorm's per-channel affine map and the activation in one in-place pass. None for every
    other call (including any argument the C++ checks do not take), which takes the checked path.
    With no backward, an nn.LeakyReLU(inplace=False) after the block computes the same values."""
    act = _ct.fast_act(activation, negative_slope)
    if act is None or act > 2 or type(input) is not torch.Tensor or not B.eager_cpu(input):
        return None
    w, b = m.weight, m.bias
    rm, rv, bw, bb = bn.running_mean, bn.running_var, bn.weight, bn.bias
    eps = bn.eps
    if (rm is None or rv is None or type(eps) not in (float, int)
            or torch._C._has_torch_function((input, w, b, rm, rv, bw, bb))
            or B.composite_only(input, w, b, bw, bb)):
        return None
    op: Any = _NO_PAIR
    groups: Any = 1
    if isinstance(m, nn.Linear):
        kind, s, p, d = 0, _NO_PAIR, _NO_PAIR, _NO_PAIR
    else:
        s, p, d = _ct.fast_pair(m.stride), _ct.fast_pair(m.padding), _ct.fast_pair(m.dilation)
        kind, groups = (2 if isinstance(m, nn.ConvTranspose2d) else 1), m.groups
        if kind == 2:
            op = _ct.fast_pair(m.output_padding)
        if (m.padding_mode != "zeros" or s is None or p is None or d is None or op is None
                or type(groups) is not int):
            return None
    try:
        return B.extension().product_bn_eval_eager(input, w, b, kind, s, p, d, op, groups, rm, rv,
                                                   bw, bb, float(eps), act, float(negative_slope))
    except (TypeError, OverflowError):
        return None


_NO_PAIR = [0, 0]  # (the geometry arguments a linear product ignores)


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook would see (or change) ``module``'s own input or output when it runs:
    its forward/backward hooks and pre-hooks, and the global module hooks."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or _m._global_forward_hooks
                or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


class ConvTransposeBNAct2d(nn.Sequential):
    """``nn.Sequential(nn.ConvTranspose2d(...), nn.BatchNorm2d(out_channels, ...))`` followed by
    an activation: the DCGAN generator block. Its state_dict keys ("0.weight", "0.bias",
    "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked") are those
    of that unfused pair, and of the triple with a parameter-free activation module appended, so
    checkpoints load either way.

    Arguments: ConvTranspose2d's (in_channels, out_channels, kernel_size, stride=1, padding=0,
    output_padding=0, groups=1, bias=True, dilation=1), then BatchNorm2d's (eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True), device=None, dtype=None; keyword-only
    activation ("relu" default, "leaky_relu", "identity", "tanh", "sigmoid") and
    negative_slope (0.01). Input (N, C_in, H, W); forward(input, output_size=None).

    In training mode the transposed convolution's epilogue also computes the per-channel batch
    statistics of its output, so the BatchNorm step reads the output once (normalise) instead of
    twice. In eval mode the BatchNorm (running statistics) is folded into the convolution's
    weight and bias (one fused transposed convolution with the activation in its epilogue)
    where that pays (``conv_bn_act_forward``: CUDA, exported graphs, large outputs); eager CPU
    calls otherwise apply the BatchNorm's affine map and the activation in one pass after it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, output_padding: int | tuple[int, int] = 0, groups: int = 1, bias: bool = True,
                 dilation: int | tuple[int, int] = 1, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
                 activation: str = "relu", negative_slope: float = 0.01) -> None:
        _ct.check_activation(activation, negative_slope)
        super().__init__(
            ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                            groups, bias, dilation, "zeros", device, dtype),
            nn.BatchNorm2d(out_channels, eps, momentum, affine, track_running_stats, device, dtype))
        self.activation = activation
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        s = f"activation={self.activation!r}"
        if self.activation == "leaky_relu":
            s += f", negative_slope={self.negative_slope}"
        return s

    def forward(self, input: torch.Tensor, output_size: Optional[list[int]] = None) -> torch.Tensor:
        _ct.check_activation(self.activation, self.negative_slope)
        children = list(self._modules.values())
        if len(children) == 2 and can_fuse_conv_bn(*children):
            check_conv_bn_input(children[1], input)
            return conv_bn_act_forward(children[0], children[1], self.activation,
                                       self.negative_slope, input, output_size)
        # A child was replaced, changed or hooked: run each child on its own, then the activation.
        x = children[0](input, output_size) if isinstance(children[0], nn.ConvTranspose2d) else children[0](input)
        for child in children[1:]:
            x = child(x)
        return apply_activation(x, self.activation, self.negative_slope)


def check_conv_bn_input(bn: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> None:
    """The checks that nn.ConvTranspose2d -> nn.BatchNorm2d make on the input's rank and on the
    BatchNorm's eps (torch's exception types and messages), made before the fused op writes
    anything (num_batches_tracked, running statistics)."""
    if isinstance(input, torch.Tensor):
        if input.dim() not in (3, 4):
            raise RuntimeError("Expected 3D (unbatched) or 4D (batched) input to conv_transpose2d, "
                               f"but got input of size: {list(input.shape)}")
        if input.dim() == 3:  # the convolution takes it, the BatchNorm2d does not
            raise ValueError("expected 4D input (got 3D input)")
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if bn_training and bn.eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {bn.eps}")
    if not bn_training and bn.eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {bn.eps}")


def can_fuse_conv_bn(conv: nn.Module, bn: nn.Module) -> bool:
    """Whether conv -> bn may run as one fused conv_bn_act_forward: a genfast ConvTranspose2d
    without activation and a plain nn.BatchNorm2d, neither hooked (nor parametrized: that
    changes the type)."""
    return (type(conv) is ConvTranspose2d and conv.activation is None
            and conv.padding_mode == "zeros" and type(bn) is nn.BatchNorm2d
            and not has_hooks(conv) and not has_hooks(bn))


def conv_bn_act_forward(conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d, activation: str,
                        negative_slope: float, input: torch.Tensor,
                        output_size: Optional[list[int]] = None,
                        keep_input: bool = False) -> torch.Tensor:
    """activation(bn(conv(input))) with the BatchNorm statistics taken in the convolution's
    epilogue (training) or, in eval, the BatchNorm folded into the convolution where fold_pays
    (else the convolution, then one pass of the BatchNorm's affine map and the activation;
    under torch.compile on the CPU, torch's BatchNorm after genfast's convolution). ``keep_input``: the
    activation is an nn.LeakyReLU(inplace=False) (torch's backward reads its input, so its output
    may be modified in place): the eval block applies it out of place after the folded
    convolution."""
    if not bn.training and output_size is None and not fold_pays(
            input, conv.weight, activation, conv.out_channels, conv.stride, transposed=True):
        # sampling: the common eager CPU call that records no backward, checked in C++ (the
        # transposed convolution, then the BatchNorm's affine map and the activation in place)
        y = product_bn_eval_fast(conv, bn, activation, negative_slope, input)
        if y is not None:
            return y
    _ct.check_activation(activation, negative_slope)
    bn_training = bn.training or (bn.running_mean is None and bn.running_var is None)
    if not bn_training:
        if B.inductor_cpu(input):
            # traced by torch.compile on the CPU: genfast's transposed convolution (its C++ op,
            # see _ct.conv_transpose2d), then torch's BatchNorm and activation, which inductor
            # fuses into one loop, instead of a fold that re-reads and re-writes the weight at
            # every call
            return apply_activation(bn(conv_transpose_act_forward(conv, input, None, 0.01, output_size)),
                                    activation, negative_slope)
        if not bn_foldable(bn, conv.weight, input, 4):
            # torch's modules one by one (their checks: parameters of another dtype)
            return apply_activation(bn(conv(input, output_size)), activation, negative_slope)
        if not fold_pays(input, conv.weight, activation, conv.out_channels, conv.stride,
                         transposed=True):
            # the transposed convolution with its bias, then genfast's fused eval BatchNorm +
            # activation (running statistics: one pass over the output)
            y = conv_transpose_act_forward(conv, input, None, 0.01, output_size)
            return bn_eval_act(bn, y, activation, negative_slope, keep_input)
        if keep_input and activation == "leaky_relu":
            return apply_activation(
                _conv_bn_act_eval(conv, bn, "identity", negative_slope, input, output_size),
                activation, negative_slope)
        return _conv_bn_act_eval(conv, bn, activation, negative_slope, input, output_size)
    if input.dim() != 4:
        raise ValueError(f"expected 4D input (got {input.dim()}D input)")
    if (B.eager_cpu(input) or B.inductor_cpu(input)) and activation in ("relu", "leaky_relu", "identity"):
        # genfast's C++ transposed convolution with the bias (torch's for arguments its kernel
        # does not take; torch's checks raise before anything is written), then genfast's fused
        # C++ BatchNorm + activation, which checks its input (more than one value per channel)
        # before the running statistics change; eager, or traced by torch.compile on the CPU.
        y = conv_transpose_act_forward(conv, input, None, 0.01, output_size)
        return batch_norm_act_forward(bn, y, activation, negative_slope)
    output_padding = conv._output_padding(input, output_size, conv.stride, conv.padding,
                                          conv.kernel_size, 2, conv.dilation)
    # under torch.autocast the product runs in the autocast dtype: the checks see the tensors it
    # will see (a float32 weight with the bfloat16 output of the block before is autocast's case)
    input, weight, bias = _ct.autocast_lower_precision(input, conv.weight, conv.bias)
    stride, padding, output_padding, dilation = _ct.check_args(
        input, weight, bias, conv.stride, conv.padding, output_padding, conv.groups,
        conv.dilation)
    hw = [(i - 1) * s - 2 * p + d * (k - 1) + op + 1 for i, k, s, p, op, d in
          zip(input.shape[2:], conv.kernel_size, stride, padding, output_padding, dilation)]
    if input.shape[0] * hw[0] * hw[1] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{torch.Size([1, conv.out_channels, *hw])}")
    # Every check above runs before anything is written; the running statistics and
    # num_batches_tracked are updated inside the block's finalize launch.
    track = bn.training and bn.track_running_stats and bn.running_mean is not None
    return _ct.conv_transpose_bn_act_train(
        input, weight, bias, stride, padding, output_padding, conv.groups, dilation,
        bn.weight, bn.bias, bn.running_mean if track else None, bn.running_var if track else None,
        bn.num_batches_tracked if track else None, bn.momentum, bn.eps, activation, negative_slope)


def _conv_bn_act_eval(conv, bn, activation, negative_slope, input, output_size):
    # Eval: BatchNorm with running statistics is a per-channel affine map, folded into the
    # transposed convolution's weight and bias (computed in float32, or float64), so the
    # whole block is one fused conv_transpose2d with the activation in its epilogue.
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    w = conv.weight
    G, cog = conv.groups, w.shape[1]
    wf = (w.to(acc).view(G, w.shape[0] // G, cog, *w.shape[2:])
          * scale.view(G, 1, cog, 1, 1)).view(w.shape).to(w.dtype)
    bf = shift if conv.bias is None else conv.bias.to(acc) * scale + shift
    if conv.padding_mode != "zeros":
        raise ValueError("Only `zeros` padding mode is supported for ConvTranspose2d")
    output_padding = conv._output_padding(input, output_size, conv.stride, conv.padding,
                                          conv.kernel_size, 2, conv.dilation)
    return GF.conv_transpose2d(input, wf, bf.to(w.dtype), conv.stride, conv.padding,
                               output_padding, conv.groups, conv.dilation,
                               activation=activation, negative_slope=negative_slope)
