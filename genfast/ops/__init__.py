"""Registered ops: fake (meta) implementations, autograd, backend choice."""
from genfast.ops import batchnorm_act  # noqa: F401
from genfast.ops import conv_transpose  # noqa: F401
from genfast.ops import conv_act  # noqa: F401
from genfast.ops import sync_batchnorm_act  # noqa: F401
from genfast.ops import losses  # noqa: F401
