"""Drop-in modules: each subclasses the torch module it replaces (same arguments, parameters,
buffers and state_dict keys); extra behaviour is keyword-only."""
from genfast.nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d
from genfast.nn.conv_act import Conv2d, Linear
from genfast.nn.conv_transpose import ConvTranspose2d, ConvTransposeBNAct2d
from genfast.nn.fused_sequential import FusedSequential
from genfast.nn.losses import BCELoss, BCEWithLogitsLoss, GANLoss, VAELoss
from genfast.nn.sync_batchnorm_act import SyncBatchNormAct2d

__all__ = ["BatchNormAct1d", "Conv2d", "Linear", "BatchNormAct2d", "ConvTranspose2d", "ConvTransposeBNAct2d", "FusedSequential",
           "SyncBatchNormAct2d", "GANLoss", "VAELoss", "BCEWithLogitsLoss", "BCELoss"]
