"""Drop-in modules: each subclasses the torch module it replaces (same arguments, parameters,
buffers and state_dict keys); extra behaviour is keyword-only."""
from genfast.nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d
from genfast.nn.sync_batchnorm_act import SyncBatchNormAct2d

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "SyncBatchNormAct2d"]
from genfast.nn.losses import BCELoss, BCEWithLogitsLoss, GANLoss, VAELoss  # noqa: E402

__all__ += ["GANLoss", "VAELoss", "BCEWithLogitsLoss", "BCELoss"]
