"""memopt: memory-efficient optimizers (Adafactor, CAME, LOMO, AdaLomo, Adapprox) as plain
``torch.optim.Optimizer`` subclasses. See ALGORITHMS in the docs for the numerical contract."""
from .adafactor import Adafactor
from .adalomo import AdaLomo
from .base import MemoptOptimizer, NonFiniteGradientError
from .came import CAME
from .fused import DynamicLossScaler
from .lomo import Lomo
from .registry import FUSED_BACKWARD, OPTIMIZERS, create_optimizer, optimizer_hparams


def __getattr__(name):
    # Adapprox is imported lazily so this package imports while it is being developed separately.
    if name == "Adapprox":
        from .adapprox import Adapprox

        return Adapprox
    raise AttributeError(name)


__all__ = [
    "Adafactor", "AdaLomo", "Adapprox", "CAME", "Lomo", "MemoptOptimizer", "NonFiniteGradientError",
    "DynamicLossScaler", "OPTIMIZERS", "FUSED_BACKWARD", "create_optimizer", "optimizer_hparams",
]
__version__ = "0.1.0"
