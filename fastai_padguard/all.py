"Everything public: `from fastai_padguard.all import *`"
from .data import *
from .core import *
from .losses import *
from .learner import *
from .compat import *
from .diagnostics import *
