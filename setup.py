"""Build genfast._C: C++ CPU kernels always, CUDA kernels when a CUDA toolkit and a CUDA build of
torch are present (GENFAST_FORCE_CUDA=1 forces them, GENFAST_NO_CUDA=1 skips them)."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _flag("GENFAST_NO_CUDA"):
        return False
    if _flag("GENFAST_FORCE_CUDA"):
        return True
    import torch

    return cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None


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
