"""genfast: fused kernels for GAN and VAE training, as drop-in PyTorch modules.

    import genfast, genfast.nn as gnn, genfast.functional as GF
"""
from genfast.backend import get_backend, set_backend  # noqa: F401
from genfast import backend as _backend

_backend.extension()  # load genfast._C (registers the C++ ops) before the Python op definitions

from genfast import ops  # noqa: E402,F401
from genfast import functional  # noqa: E402,F401
from genfast import nn  # noqa: E402,F401
from genfast.convert import convert  # noqa: E402,F401

__version__ = "0.1.0"
__all__ = ["convert", "functional", "nn", "set_backend", "get_backend", "__version__"]
