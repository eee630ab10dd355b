"""The activation table for every Triton kernel (mirrors csrc/common/activation.h and
genfast/reference/activation.py). ACT is a genfast.backend.ACTIVATIONS code: 0 identity,
1 relu, 2 leaky_relu, 3 tanh, 4 sigmoid; slope is leaky_relu's negative slope."""
import triton
import triton.language as tl


@triton.jit
def act_forward(z, ACT: tl.constexpr, slope):
    # z: pre-activation tile in the accumulator dtype; ACT: genfast.backend.ACTIVATIONS code;
    # slope: leaky_relu negative slope.
    if ACT == 1:
        # z < 0 rather than z > 0: NaN and -0.0 pass through, as in torch.
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == 3:
        z = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
    elif ACT == 4:
        z = 1.0 / (1.0 + tl.exp(-z))
    return z


@triton.jit
def act_grad_from_z(z, ACT: tl.constexpr, slope):
    # f'(z) from the pre-activation, torch's conventions: at 0 the negative side's slope; at NaN
    # relu passes the gradient (torch masks where relu(z) <= 0), leaky_relu takes the slope.
    one = tl.full(z.shape, 1.0, z.dtype)
    if ACT == 1:
        g = tl.where(z <= 0, 0.0 * one, one)
    elif ACT == 2:
        g = tl.where(z > 0, one, one * slope)
    elif ACT == 3:
        t = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)
        g = one - t * t
    elif ACT == 4:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = s * (one - s)
    else:
        g = one
    return g


@triton.jit
def act_grad_from_y(y, ACT: tl.constexpr, slope):
    # f'(z) from the output y = f(z) (needs slope >= 0 for leaky_relu); y in float32/float64.
    one = tl.full(y.shape, 1.0, y.dtype)
    if ACT == 1:
        g = tl.where(y <= 0, 0.0 * one, one)
    elif ACT == 2:
        g = tl.where(y > 0, one, one * slope)
    elif ACT == 3:
        g = one - y * y
    elif ACT == 4:
        g = y * (one - y)
    else:
        g = one
    return g


@triton.jit
def act_invert(y, ACT: tl.constexpr, slope):
    # z = f^-1(y) (identity, leaky_relu with slope > 0; relu is passed through as the C++ op does).
    if ACT == 2:
        out = tl.where(y > 0, y, y / slope)
    else:
        out = y
    return out


@triton.jit
def act_backward_from_y(dy, y, ACT: tl.constexpr, slope):
    # dz = dy * f'(z) from the output y, as torch's activation backward: relu selects (its
    # threshold_backward passes dy where y > 0 or y is NaN and gives 0 elsewhere, a NaN or inf dy
    # included, where a product with f' = 0 would give NaN); the others multiply.
    if ACT == 1:
        dz = tl.where(y <= 0, 0.0, dy)
    else:
        dz = dy * act_grad_from_y(y, ACT, slope)
    return dz


@triton.jit
def act_backward_from_z(dy, z, ACT: tl.constexpr, slope):
    # The same from the pre-activation z (relu: 0 where z <= 0, where its output is 0).
    if ACT == 1:
        dz = tl.where(z <= 0, 0.0, dy)
    else:
        dz = dy * act_grad_from_z(z, ACT, slope)
    return dz
