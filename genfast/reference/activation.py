"""The activation table in plain PyTorch (mirrors csrc/common/activation.h)."""
import torch


def act_forward(z: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    if activation == "identity":
        return z
    if activation == "relu":
        # z < 0 rather than z > 0: NaN and -0.0 pass through, as in torch.
        return torch.where(z < 0, torch.zeros_like(z), z)
    if activation == "leaky_relu":
        return torch.where(z > 0, z, z * negative_slope)
    if activation == "tanh":
        return torch.tanh(z)
    if activation == "sigmoid":
        return torch.sigmoid(z)
    raise ValueError(f"unknown activation {activation!r}")


def act_grad(z: torch.Tensor, activation: str, negative_slope: float) -> torch.Tensor:
    """f'(z), with torch's conventions: at 0 the negative side's slope; at NaN relu passes the
    gradient (torch masks where relu(z) <= 0) and leaky_relu takes the slope."""
    if activation == "identity":
        return torch.ones_like(z)
    if activation == "relu":
        return torch.where(z <= 0, torch.zeros_like(z), torch.ones_like(z))
    if activation == "leaky_relu":
        return torch.where(z > 0, torch.ones_like(z), torch.full_like(z, negative_slope))
    if activation == "tanh":
        t = torch.tanh(z)
        return 1 - t * t
    if activation == "sigmoid":
        s = torch.sigmoid(z)
        return s * (1 - s)
    raise ValueError(f"unknown activation {activation!r}")


def act_backward(dy: torch.Tensor, z: torch.Tensor, activation: str,
                 negative_slope: float) -> torch.Tensor:
    """dy * f'(z) through torch's own activation-backward ops where torch has them (relu,
    leaky_relu): those are differentiable in z, with a zero derivative, so that a gradient taken
    through them reaches whatever z depends on (a BatchNorm bias gets zeros, not None, in a
    double backward, as through torch's modules)."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(dy, z, 0)
    if activation == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(dy, z, negative_slope, False)
    if activation == "identity":
        return dy
    return dy * act_grad(z, activation, negative_slope)
