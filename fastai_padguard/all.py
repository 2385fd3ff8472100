"What a user calls: `from fastai_padguard.all import *`"
from .core import PadGuard
from .losses import PadCrossEntropyLossFlat
from .learner import padguard
from .diagnostics import pad_audit, PadMonitor
from .compat import patch_weight_dropout

__all__ = ['PadGuard', 'padguard', 'PadCrossEntropyLossFlat', 'pad_audit', 'PadMonitor', 'patch_weight_dropout']
