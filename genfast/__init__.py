"""genfast: fused kernels for GAN and VAE training, as drop-in PyTorch modules.

    import genfast, genfast.nn as gnn, genfast.functional as GF

Importing genfast registers its ops (``torch.ops.genfast.*``), so import it before
``torch.export.load`` of a program that contains them.
"""
from genfast.backend import get_backend, set_backend
from genfast import backend as _backend

_backend.extension()  # load genfast._C (registers the C++ ops) before the Python op definitions

from genfast import ops  # noqa: E402,F401
from genfast import functional  # noqa: E402
from genfast import nn  # noqa: E402
from genfast.convert import convert  # noqa: E402
from genfast import models  # noqa: E402

__version__ = "0.1.0"


def _refuse_jit_script(module: object) -> None:
    raise RuntimeError(
        f"genfast: torch.jit.script is not supported ({type(module).__name__}): TorchScript is "
        "deprecated in torch 2.14 and cannot compile genfast's custom ops and autograd Functions. "
        "Use torch.export (import genfast before torch.export.load) or torch.compile instead.")


# torch.jit.script calls __prepare_scriptable__ on the module and each submodule before compiling.
for _name in nn.__all__:
    setattr(getattr(nn, _name), "__prepare_scriptable__", _refuse_jit_script)

__all__ = ["convert", "functional", "models", "nn", "set_backend", "get_backend", "__version__"]
