"""SAM-family optimizers as plain ``torch.optim.Optimizer`` classes.

Every method: ``Cls(params, base_optimizer=<optimizer class>, <method hyperparameters>,
**base_optimizer_kwargs)`` and ``loss = opt.step(closure)``.
"""
from .a2sam import A2SAM
from .asam import ASAM
from .base import SharpnessAwareOptimizer
from .eg_sam import EGSAM
from .esam import ESAM
from .bn import first_pass_updates_bn, frozen_bn_stats
from .friendly import FriendlySAM
from .gsam import GSAM
from .hatam import HATAM
from .imbalanced import ImbSAM, split_loss, tail_class_mask
from .looksam import LookSAM
from .mesa import MESA
from .msam import MSAM
from .og_sam import OGSAM
from .saf import SAF
from .sam import SAM
from .sparse import SSAMD, SSAMF, SparseSAM
from .xsam import XSAM

from .registry import MethodInfo, method, methods, register, register_method


def __getattr__(name: str):
    if name == "METHODS":  # method name → class (None: the plain base optimizer), from the registry
        return {n: info.cls for n, info in methods().items()}
    raise AttributeError(f"module 'sharpbench.optim' has no attribute {name!r}")


__all__ = ["SAM", "ASAM", "SharpnessAwareOptimizer", "METHODS", "MethodInfo", "method", "methods",
           "register", "register_method", "first_pass_updates_bn",
           "frozen_bn_stats"]
__all__ += ["A2SAM", "XSAM", "HATAM", "LookSAM", "MSAM", "ESAM", "SAF", "MESA", "EGSAM", "OGSAM"]
__all__ += ["FriendlySAM", "SSAMF", "SSAMD", "SparseSAM", "ImbSAM", "GSAM", "split_loss",
            "tail_class_mask"]
