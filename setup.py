"""Build genfast._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present (GENFAST_FORCE_CUDA=1 forces them, GENFAST_NO_CUDA=1 skips them).

Install with ``pip install --no-build-isolation .``: the extension must be compiled against the
torch that will import it, so setup.py refuses to run inside pip's isolated build environment.
CUDA kernels are compiled for TORCH_CUDA_ARCH_LIST when it is set; otherwise for the visible GPUs'
architectures, or (GENFAST_FORCE_CUDA=1) for the architectures genfast targets (8.0 and 9.0). With
no GPU visible and neither variable set they are skipped with a one-line message: the Triton
kernels, which `auto` runs on CUDA tensors, need no compilation here, and the CUDA C++ kernels
took most of the build (about 2 of 4.5 minutes on two cores). MAX_JOBS (default: the usable CPU
cores) sets how many files compile at once."""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

# The architectures genfast's kernels are written and measured for (A100, H100/H200).
DEFAULT_ARCHS = "8.0;9.0"

NO_ISOLATION = (
    "genfast compiles a C++/CUDA extension against the installed torch; build isolation would "
    "build it against another torch in a throw-away environment. Install torch first, then run "
    "`pip install --no-build-isolation .` (or `pip install --no-build-isolation -e .`).")

# Path fragments of the throw-away environments that PEP 517 front ends build in
# (pip: pip-build-env-*, pypa/build: build-env-*, uv: builds-v*).
_ISOLATED_ENV_MARKS = ("pip-build-env-", "build-env-", os.sep + "builds-v")


def _isolated(path):
    return any(mark in path for mark in _ISOLATED_ENV_MARKS)


def _import_torch():
    """torch, checked to be the one the package will run with; exits with a clear message
    otherwise (before any compilation)."""
    isolated = any(_isolated(p) for p in sys.path)
    try:
        import torch
    except ImportError:
        sys.exit("genfast: torch is not importable here. " + NO_ISOLATION if isolated else
                 "genfast: install torch first (https://pytorch.org), then "
                 "`pip install --no-build-isolation .`")
    if _isolated(torch.__file__):
        sys.exit(f"genfast: torch {torch.__version__} was imported from a build environment "
                 f"({os.path.dirname(torch.__file__)}). " + NO_ISOLATION)
    return torch


def _is_toolkit(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))


def _set_cuda_home():
    """torch guesses CUDA_HOME from the nvcc on PATH; when that nvcc is a wrapper script (as in
    /usr/local/bin/nvcc -> /usr/local/cuda-13.0/bin/nvcc) the guess is a directory without the
    toolkit's headers. Unless the user set CUDA_HOME/CUDA_PATH, point it at a real toolkit.
    Runs before torch.utils.cpp_extension is imported (it reads the variable at import)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc and _is_toolkit(os.path.dirname(os.path.dirname(nvcc))):
        return
    if _is_toolkit("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


torch = _import_torch()
_set_cuda_home()

from torch.utils import cpp_extension  # noqa: E402


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _gpu_visible():
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver install: treat as no GPU
        return False


def _cuda_plan():
    """(compile the CUDA kernels?, the line setup.py prints about it)."""
    if _flag("GENFAST_NO_CUDA"):
        return False, "genfast: GENFAST_NO_CUDA=1: CUDA kernels not compiled"
    forced = _flag("GENFAST_FORCE_CUDA")
    if not forced and not (_is_toolkit(cpp_extension.CUDA_HOME) and torch.version.cuda is not None):
        return False, "genfast: no CUDA toolkit or CPU-only torch: CUDA kernels not compiled"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return True, f"genfast: compiling CUDA kernels for TORCH_CUDA_ARCH_LIST={archs} (GENFAST_NO_CUDA=1 skips them)"
    if forced:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
        return True, f"genfast: GENFAST_FORCE_CUDA=1: compiling CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_ARCHS}"
    if _gpu_visible():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a}.{b}" for a, b in caps)
        return True, (f"genfast: compiling CUDA kernels for the visible GPUs, TORCH_CUDA_ARCH_LIST="
                      f"{os.environ['TORCH_CUDA_ARCH_LIST']} (GENFAST_NO_CUDA=1 skips them)")
    return False, ("genfast: no GPU visible: CUDA C++ kernels not compiled (Triton kernels still run on CUDA); "
                   "set TORCH_CUDA_ARCH_LIST='8.0;9.0' or GENFAST_FORCE_CUDA=1 to compile them")


_CUDA, _CUDA_LINE = _cuda_plan()
print(_CUDA_LINE)


def _want_cuda():
    return _CUDA


def _cores():
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno"]
    include = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return cpp_extension.CppExtension(
            "genfast._C", cpp, include_dirs=include, extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    library_dirs = []
    home = cpp_extension.CUDA_HOME
    for sub in ("lib64", "lib"):
        d = os.path.join(home, sub)
        if os.path.isdir(d) and glob.glob(os.path.join(d, "libcudart*")):
            library_dirs.append(d)
    return cpp_extension.CUDAExtension(
        "genfast._C",
        cpp + cu,
        include_dirs=include,
        library_dirs=library_dirs,
        define_macros=[("GENFAST_WITH_CUDA", None)],
        extra_compile_args={
            "cxx": cxx + ["-DGENFAST_WITH_CUDA"],
            "nvcc": ["-O3", "-lineinfo", "-DGENFAST_WITH_CUDA"],
        },
        extra_link_args=["-fopenmp"],
    )


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension (ninja, MAX_JOBS parallel compiles) that also writes
    genfast/_build_info.py next to the extension: the torch version it was compiled against,
    which genfast checks at import before loading the extension."""

    def run(self):
        os.environ.setdefault("MAX_JOBS", str(_cores()))
        super().run()
        target = os.path.join(os.path.dirname(self.get_ext_fullpath("genfast._C")), "_build_info.py")
        with open(target, "w") as f:
            f.write('"""Written by setup.py when it compiled genfast._C."""\n'
                    f"TORCH_VERSION = {torch.__version__!r}\n"
                    f"CUDA_VERSION = {torch.version.cuda!r}\n"
                    f"CUDA_ARCHS = {os.environ.get('TORCH_CUDA_ARCH_LIST', '') if _want_cuda() else ''!r}\n")


setup(
    packages=find_packages(include=["genfast", "genfast.*"]),
    package_data={"genfast": ["py.typed"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
