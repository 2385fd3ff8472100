"What a user calls: `from fastai_padguard.all import *`"
from .core import PadGuard
from .losses import PadCrossEntropyLossFlat
from .learner import padguard
from .diagnostics import pad_audit, PadMonitor, row_audit, init_untrained_rows
from .compat import patch_weight_dropout
from .train_rows import train_rows, RowTrainer, new_rows, added_rows

__all__ = ['PadGuard', 'padguard', 'PadCrossEntropyLossFlat', 'pad_audit', 'PadMonitor', 'row_audit', 'init_untrained_rows',
           'patch_weight_dropout', 'train_rows', 'RowTrainer', 'new_rows', 'added_rows']
