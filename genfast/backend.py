"""Which backends exist in this install, and which one runs each op.

Backends: ``cuda`` (C++/CUDA extension), ``triton``, ``cpu`` (C++ extension), ``reference``
(plain PyTorch). ``auto`` picks, per op family and device, the one the benchmarks measured
fastest; on a CPU tensor it is ``cpu``.
"""
from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from typing import Any, Callable

import torch
import torch.autograd.forward_ad as _fwad

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")

# Activation codes shared with csrc/common/activation.h and the Triton kernels.
ACTIVATIONS = {"identity": 0, "relu": 1, "leaky_relu": 2, "tanh": 3, "sigmoid": 4}

# What `auto` runs on a CUDA tensor, per op family: the genfast backend that
# benchmarks/gpu_suite.sh measured faster (CUDA C++ vs Triton), citing the committed results
# file. No GPU result is committed yet (benchmarks/results/ holds CPU results only), so
# batchnorm_act and losses keep Triton, unmeasured, until one is; then each entry names the
# faster backend and the benchmarks/results/<gpu>.json it comes from.
AUTO_CUDA = {
    "batchnorm_act": "triton",
    "losses": "triton",
    # cuDNN's products through ATen + genfast's epilogue kernels (DESIGN.md: fuse around the
    # vendor library, replace it only where a committed GPU benchmark shows genfast's GEMM
    # faster; none has been measured yet, so the Triton implicit GEMM runs only when asked for).
    "conv_transpose": "cuda",
    # Conv2d / Linear: cuDNN / cuBLAS products + the same epilogue kernels (genfast has no GEMM
    # of its own for them).
    "conv_act": "cuda",
}

# Backends with kernels for each family; a family not listed has all four.
FAMILY_BACKENDS: dict[str, tuple[str, ...]] = {}

_state = threading.local()
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


_EXT: list[Any] = []  # [module or None] once loaded

BUILD_COMMAND = "pip install --no-build-isolation -e ."


def _build_record(name: str) -> str | None:
    """A value setup.py recorded in genfast/_build_info.py when it compiled genfast._C, or None
    when the extension was built without that record."""
    try:
        record = importlib.import_module("genfast._build_info")
    except ImportError:
        return None
    return str(getattr(record, name))


def _build_torch_version() -> str | None:
    """The torch version genfast._C was compiled against, or None when not recorded."""
    return _build_record("TORCH_VERSION")


def build_cuda_archs() -> str:
    """The CUDA architectures genfast._C's kernels were compiled for ("" when none or unknown)."""
    return _build_record("CUDA_ARCHS") or ""


def extension() -> Any:
    """The compiled module ``genfast._C``, or None (with one warning) when it is not built, fails
    to load, or was built against another torch version than the running one."""
    if _EXT:
        return _EXT[0]
    _EXT.append(_load_extension())
    return _EXT[0]


def _load_extension() -> Any:
    fallback = ("the cpu and cuda backends are off and CPU tensors use the reference (plain "
                "PyTorch) backend")
    if importlib.util.find_spec("genfast._C") is None:
        here = os.path.dirname(os.path.abspath(__file__))
        warnings.warn(
            f"genfast: the compiled extension genfast._C is not built (no _C*.so in {here}); "
            f"{fallback}. Build it from the source tree with `{BUILD_COMMAND}`.",
            RuntimeWarning, stacklevel=3)
        return None
    built = _build_torch_version()
    if built is not None and built != torch.__version__:
        warnings.warn(
            f"genfast: genfast._C was built against torch {built} but torch {torch.__version__} is "
            f"running; a C++ extension only works with the torch it was compiled against, so it is "
            f"not loaded: {fallback}. Rebuild it with `{BUILD_COMMAND}`.",
            RuntimeWarning, stacklevel=3)
        return None
    try:
        ext = importlib.import_module("genfast._C")  # registers the genfast:: C++ ops
    except ImportError as exc:
        warnings.warn(
            f"genfast: genfast._C is present but does not load ({exc}); {fallback}. Rebuild it "
            f"with `{BUILD_COMMAND}`.", RuntimeWarning, stacklevel=3)
        return None
    return ext


def has_cpu_ext() -> bool:
    return extension() is not None


def has_cuda_ext() -> bool:
    ext = extension()
    return ext is not None and ext.built_with_cuda()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def has_triton() -> bool:
    return _HAS_TRITON


def set_backend(name: str) -> None:
    """Select the backend for every genfast op in this thread: "auto" (default), "triton",
    "cuda", "cpu" or "reference". The environment variable GENFAST_BACKEND sets the default (read
    once, at the first genfast op call)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _state.name = name


_ENV_DEFAULT: list[str] = []  # GENFAST_BACKEND, read at the first call that needs it


def get_backend() -> str:
    # (the thread-local's __dict__: getattr with a default raises and catches AttributeError
    # inside while no backend is set, ten times slower on every op call)
    name = _state.__dict__.get("name")
    if name is None:
        if not _ENV_DEFAULT:
            # Read once: os.environ lookups cost microseconds on every op call.
            env = os.environ.get("GENFAST_BACKEND", "auto") or "auto"
            if env not in BACKENDS:
                raise ValueError(f"GENFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            _ENV_DEFAULT.append(env)
        name = _ENV_DEFAULT[0]
    return name


class use_backend:
    """Context manager: ``with genfast.backend.use_backend("reference"): ...``."""

    def __init__(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
        self.name = name

    def __enter__(self) -> "use_backend":
        self.prev = getattr(_state, "name", None)
        _state.name = self.name
        return self

    def __exit__(self, *exc: object) -> None:
        _state.name = self.prev


def family_supports(family: str, name: str) -> bool:
    """Whether op family `family` has kernels for backend `name`."""
    return name in FAMILY_BACKENDS.get(family, BACKENDS)


# Families whose "cuda" backend is ATen's products + genfast's Triton epilogue kernels: it needs
# Triton, not the CUDA C++ extension.
_CUDA_VIA_TRITON = ("conv_transpose", "conv_act")


def available(name: str, device: torch.device, family: str | None = None) -> tuple[bool, str]:
    """Whether backend ``name`` can run ``family``'s ops on ``device``, and why not."""
    cuda = device.type == "cuda"
    if name == "cuda" and family in _CUDA_VIA_TRITON:
        if not cuda:
            return False, "the cuda backend runs on CUDA tensors only"
        return has_triton(), "triton is not installed (it runs the epilogue kernels)"
    if name == "reference":
        return True, ""
    if name == "cpu":
        if cuda:
            return False, "the cpu backend runs on CPU tensors only"
        return has_cpu_ext(), "genfast._C is not built"
    if name == "cuda":
        if not cuda:
            return False, "the cuda backend runs on CUDA tensors only"
        return has_cuda_ext(), "genfast._C was built without CUDA kernels"
    if name == "triton":
        if not has_triton():
            return False, "triton is not installed"
        if cuda or triton_interpret():
            return True, ""
        return False, "the triton backend needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors"
    raise ValueError(f"unknown backend {name!r}")


def resolve(family: str, device: torch.device) -> str:
    """The backend that runs ``family`` on ``device`` under the current setting."""
    name = get_backend()
    if name != "auto":
        ok, why = available(name, device, family)
        if not ok:
            raise RuntimeError(f"genfast: backend {name!r} cannot run on {device.type} tensors: {why}")
        return name
    return _auto(family, device)


def _auto(family: str, device: torch.device) -> str:
    if device.type == "cuda":
        for candidate in (AUTO_CUDA.get(family, "triton"), "cuda", "triton"):
            if available(candidate, device, family)[0]:
                return candidate
        warn_once(f"auto-ref-cuda-{family}",
                  f"genfast: no fused {family} kernel is available for CUDA tensors (neither "
                  "triton nor the CUDA extension); using the reference backend")
        return "reference"
    if device.type == "cpu" and has_cpu_ext():
        if family == "losses" and not cpu_losses_supported():
            warn_once("auto-ref-cpu-losses",
                      "genfast: this CPU lacks AVX2/FMA/F16C, which genfast's CPU loss kernels need; "
                      "the losses use the reference backend")
            return "reference"
        return "cpu"
    return "reference"


_CPU_LOSSES: list[bool] = []


def cpu_losses_supported() -> bool:
    """Whether this CPU runs genfast's SIMD loss kernels (asked once of genfast._C)."""
    if not _CPU_LOSSES:
        _CPU_LOSSES.append(bool(extension().cpu_losses_supported()))
    return _CPU_LOSSES[0]


def _set_mode(setter: str, mode: str) -> None:
    """genfast._C.<setter>(mode), which checks mode (ValueError naming it)."""
    ext = extension()
    if ext is None:
        raise RuntimeError(f"{setter}: genfast._C is not loaded (see the warning at import)")
    getattr(ext, setter)(mode)


def _get_mode(getter: str) -> str:
    """genfast._C.<getter>() ("auto" when genfast._C is not loaded)."""
    ext = extension()
    return "auto" if ext is None else str(getattr(ext, getter)())


class _ModeContext:
    """Context manager base of the CPU product settings: _set(mode) inside the block, the mode
    _get() gave before it after it."""

    _get: Callable[[], str]
    _set: Callable[[str], None]

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.prev = "auto"

    def __enter__(self) -> "_ModeContext":
        self.prev = type(self)._get()
        type(self)._set(self.mode)
        return self

    def __exit__(self, *exc: object) -> None:
        type(self)._set(self.prev)


def set_cpu_row_gemm(mode: str) -> None:
    """Where the CPU transposed convolution (and a Conv2d's grad_input) runs its GEMM form with
    the row layout (one BLAS product, then our col2im epilogue; more than 8 output channels):
    "auto" (the default: by shape, from a 1x1 input or where each output value has at most 4
    columns, KH*KW <= 4*SH*SW, the shapes where it measured faster than ATen's oneDNN product;
    csrc/cpu/conv_transpose.cpp), "always", "never" or "images_inner". Under "auto" the layers
    with more columns per output value (e.g. k5 s2) and more than 8 output channels run ATen's
    product (or Winograd's, set_cpu_winograd); "images_inner" gives them the images-inner layout
    instead (the same BLAS product with the batch's images innermost, then our col2im: faster
    than ATen's on the CI host in one state, 20-30% slower in another); "always" and "never"
    give every layer with more than 8 output channels the row layout or ATen's product.
    Process-wide; the plane layout (up to 8 output channels) is unaffected."""
    _set_mode("set_cpu_row_gemm", mode)


def get_cpu_row_gemm() -> str:
    """The mode set_cpu_row_gemm set ("auto" when genfast._C is not loaded)."""
    return _get_mode("cpu_row_gemm")


class cpu_row_gemm(_ModeContext):
    """Context manager: set_cpu_row_gemm(mode) inside the block, the previous mode after it."""

    _get = staticmethod(get_cpu_row_gemm)
    _set = staticmethod(set_cpu_row_gemm)


def set_cpu_winograd(mode: str) -> None:
    """Where the CPU products with kernel 4, stride 2, padding 1 (float32, NCHW, groups 1) run
    Winograd's F(4x4, 2x2), 2.56x fewer multiply-adds than the direct product, with a float32
    error within about 4x the direct product's, and those with kernel 5, stride 2, padding 2
    (output_padding 1 as a transposed convolution: the Keras-style 28x28 models' layers)
    F(4x4, 3x3), about 2.1x fewer on 7x7 maps, with an error of 10-14x the direct product's
    (csrc/cpu/conv_transpose_winograd.cpp): the
    transposed convolution's forward and grad_input (DCGAN's generator layers) and a Conv2d's
    forward (the discriminator's layers: its product is that grad_input) in genfast's Conv2d,
    its no-grad call and its eval BatchNorm block. "auto" (the default, the shapes where it
    measured faster: maps that are multiples of 4, at least 64 input and 32 output channels,
    counted as a transposed convolution, from 64 4x4 input tiles over the batch with at least 4
    per image or from 16 in one image, and while the scratch stays within 64 MB for the
    transformed weight and 32 MB per image; k5: the same channels, from 64 tiles with at least 4
    per image, map sides not 2 more than a multiple of 4), "always" or "never". A call whose Winograd
    values come out non-finite (an inf or NaN in the input, weight or gradient, or an overflow)
    runs the direct product instead, which gives torch's NaN / inf pattern and its finite values
    to rounding; so does a call whose input, weight or gradient holds an outlier (fewer than 10%
    of its nonzero values within 16x of its largest magnitude), whose rounding a transform would
    spread over its tile. Process-wide."""
    _set_mode("set_cpu_winograd", mode)


def get_cpu_winograd() -> str:
    """The mode set_cpu_winograd set ("auto" when genfast._C is not loaded)."""
    return _get_mode("cpu_winograd")


class cpu_winograd(_ModeContext):
    """Context manager: set_cpu_winograd(mode) inside the block, the previous mode after it."""

    _get = staticmethod(get_cpu_winograd)
    _set = staticmethod(set_cpu_winograd)


def eager_cpu(input: object) -> bool:
    """Whether a call on ``input`` runs genfast's eager CPU path: a CPU tensor, the backend
    setting "auto" or "cpu" with genfast._C loaded, and not inside torch.compile / export
    tracing. Those calls go straight to torch's products and genfast's C++ kernels (autograd
    in C++), skipping the registered Python custom ops, whose dispatch cost as much as the
    kernels at GAN layer sizes on the CPU. A pinned backend that cannot run here ("cuda",
    "triton") is left to :func:`resolve`, which raises."""
    if not isinstance(input, torch.Tensor) or not input.is_cpu:
        return False
    return get_backend() in ("auto", "cpu") and has_cpu_ext() and not torch.compiler.is_compiling()


def inductor_cpu(input: object) -> bool:
    """Whether a call on ``input`` is being traced by torch.compile (not torch.export) for CPU
    tensors with the backend on "auto". Those blocks are written as torch's own modules and
    functions, which inductor fuses itself (the product as an external call, the bias,
    BatchNorm's affine map and the activation in one generated loop): on the CPU genfast's
    products are torch's anyway, and the registered ops are opaque to inductor. Measured on the
    CI CPU, a compiled converted generator sampled at 0.38-0.66x eager through the registered ops
    and the folded BatchNorm (which re-reads and re-writes every weight per call), where the
    compiled torch model ran at 1.0-1.4x. An exported program keeps the registered ops (backend
    "auto", resolved where it runs), as does a pinned backend."""
    return (isinstance(input, torch.Tensor) and input.is_cpu and torch.compiler.is_compiling()
            and not torch.compiler.is_exporting() and get_backend() == "auto")


def composite_only(*ts: object) -> bool:
    """Whether forward-mode AD (a dual tensor among ``ts``) or a functorch transform
    (torch.func.grad / vjp / jvp / vmap: wrapped tensors) is in play. genfast's loss,
    reparameterisation and BatchNorm nodes (C++ and Python autograd Functions) have no jvp and no
    functorch rule, so those calls run the reference formulas (torch ops), which have both, as
    torch's own expressions do. False while torch.compile traces (it handles both itself, and
    cannot trace these checks)."""
    if torch.compiler.is_compiling():
        return False
    for t in ts:
        if isinstance(t, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
    if _fwad._current_level >= 0:
        return any(isinstance(t, torch.Tensor) and _fwad.unpack_dual(t).tangent is not None for t in ts)
    return False


def dual_among(*ts: object) -> bool:
    """Whether a forward-mode AD dual tensor is among ``ts`` (composite_only's forward-AD half, at
    the cost of one attribute read when no dual level is open: for the eager fast paths, whose
    products without a backward have no jvp)."""
    return _fwad._current_level >= 0 and composite_only(*ts)


def for_op(name: str) -> str:
    """The ``backend`` argument an entry point passes to a registered op, given ``name`` =
    resolve(...): ``name`` itself when the user pinned a backend (set_backend, use_backend or
    GENFAST_BACKEND), else "auto", which the op resolves when it runs (:func:`at_run`). So a
    graph traced by torch.export carries "auto" and picks the kernels for the device it runs on."""
    return name if get_backend() != "auto" else "auto"


def at_run(family: str, backend: str, device: torch.device) -> str:
    """The backend a registered op of ``family`` runs on a tensor on ``device``: ``backend``
    when it names one, else what "auto" picks for that device. Raises RuntimeError when "auto"
    finds no fused kernel there (an exported program run where genfast._C or triton is missing:
    the entry points take the reference path before reaching an op in that case)."""
    if backend != "auto":
        return backend
    name = _auto(family, device)
    if name == "reference":
        raise RuntimeError(
            f"genfast: this program calls a fused genfast {family} op on {device.type} tensors, "
            f"but no fused {family} kernel is available for them in this install (genfast._C: "
            f"{'built' if has_cpu_ext() else 'not built'}, CUDA kernels: "
            f"{'yes' if has_cuda_ext() else 'no'}, triton: {'yes' if has_triton() else 'no'}). "
            f"Build the extension with `{BUILD_COMMAND}`, or trace the model again in this install.")
    return name


def set_cpu_tap_gemm(mode: str) -> None:
    """Where the CPU transposed convolution (float32, NCHW, groups 1) runs its product by
    genfast's own AVX2 GEMM over only the (input pixel, kernel tap) pairs that land inside the
    output (csrc/cpu/conv_transpose_taps.cpp), forward and, where the GEMM form's backward does
    not run (the k5 s2 layers), grad_input and grad_weight: "auto" (the default: on CPUs with AVX2
    and FMA but without AVX-512, where at most 90% of the (pixel, tap) pairs land in the output
    and there is a block of 16 output channels per thread: the small maps of a generator's first
    layers, where it measured faster than ATen's product and our MKL GEMM form), "always" (every
    such call on a CPU with AVX2 and FMA) or "never". Process-wide; Winograd's product
    (set_cpu_winograd) goes first where it takes the shape."""
    _set_mode("set_cpu_tap_gemm", mode)


def get_cpu_tap_gemm() -> str:
    """The mode set_cpu_tap_gemm set ("auto" when genfast._C is not loaded)."""
    return _get_mode("cpu_tap_gemm")


class cpu_tap_gemm(_ModeContext):
    """Context manager: set_cpu_tap_gemm(mode) inside the block, the previous mode after it."""

    _get = staticmethod(get_cpu_tap_gemm)
    _set = staticmethod(set_cpu_tap_gemm)


def set_cpu_linear_gemm(mode: str) -> None:
    """Where the CPU Linear layer (genfast.nn.Linear, GF.linear and the Linear blocks; float32,
    contiguous input and weight) runs its backward products (grad_input, grad_weight) by
    genfast's own AVX2 GEMM (csrc/cpu/linear_gemm.cpp) instead of MKL's (the forward is MKL's in
    every mode): "auto" (the default: on CPUs with AVX2 and FMA but without AVX-512, with more
    than one thread, for 16 to 128 rows and at least 128 input and output features: MLP batches,
    where it measured faster than MKL's products), "always" (every such call on a CPU with AVX2
    and FMA) or "never". Process-wide. Each gradient value is the direct sum of its terms in one
    fixed order: they do not depend on the number of threads."""
    _set_mode("set_cpu_linear_gemm", mode)


def get_cpu_linear_gemm() -> str:
    """The mode set_cpu_linear_gemm set ("auto" when genfast._C is not loaded)."""
    return _get_mode("cpu_linear_gemm")


class cpu_linear_gemm(_ModeContext):
    """Context manager: set_cpu_linear_gemm(mode) inside the block, the previous mode after it."""

    _get = staticmethod(get_cpu_linear_gemm)
    _set = staticmethod(set_cpu_linear_gemm)
