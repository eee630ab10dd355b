"""Build genfast._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present (GENFAST_FORCE_CUDA=1 forces them, GENFAST_NO_CUDA=1 skips them)."""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


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


_set_cuda_home()

from torch.utils import cpp_extension  # noqa: E402


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("GENFAST_NO_CUDA"):
        return False
    if _flag("GENFAST_FORCE_CUDA"):
        return True
    import torch

    return _is_toolkit(cpp_extension.CUDA_HOME) and torch.version.cuda is not None


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
    # Hopper first; sm_80 keeps the extension usable on A100s. TORCH_CUDA_ARCH_LIST overrides.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
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


setup(
    packages=find_packages(include=["genfast", "genfast.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
