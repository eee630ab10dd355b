"""``python -m genfast.info``: versions, what was built, and which backend each op family runs
on CPU and CUDA tensors."""
from __future__ import annotations

import platform

import torch

from genfast import backend as B

FAMILIES = ("batchnorm_act", "losses", "conv_transpose", "conv_act")


def report() -> str:
    lines = [f"genfast {__import__('genfast').__version__}",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if B.triton_interpret() else ""))
    except ImportError:
        lines.append("triton: not installed")
    ext = B.extension()
    built = B._build_torch_version()
    if ext is not None:
        archs = B.build_cuda_archs()
        lines.append("genfast._C: built, CPU kernels" + (f" + CUDA kernels ({archs})" if B.has_cuda_ext() else
                                                         ", no CUDA kernels")
                     + (f"; compiled against torch {built}" if built else ""))
    elif built is not None and built != torch.__version__:
        lines.append(f"genfast._C: NOT loaded: built against torch {built}, running {torch.__version__} "
                     f"(rebuild: {B.BUILD_COMMAND})")
    else:
        lines.append(f"genfast._C: NOT built (reference backend on CPU; build: {B.BUILD_COMMAND})")
    cuda_ok = torch.cuda.is_available()
    lines.append("CUDA device: " + (torch.cuda.get_device_name() if cuda_ok else "none"))
    lines.append(f"backend setting: {B.get_backend()}")
    lines.append("")
    lines.append(f"{'op family':<16}{'cpu tensors':<14}{'cuda tensors':<14}")
    for fam in FAMILIES:
        cpu = _try(fam, torch.device("cpu"))
        gpu = _try(fam, torch.device("cuda")) if cuda_ok else "(no device)"
        lines.append(f"{fam:<16}{cpu:<14}{gpu:<14}")
    return "\n".join(lines)


def _try(family: str, device: torch.device) -> str:
    try:
        return B.resolve(family, device)
    except RuntimeError as exc:
        return f"error: {exc}"


if __name__ == "__main__":
    import genfast  # noqa: F401  (registers the ops)

    print(report())
