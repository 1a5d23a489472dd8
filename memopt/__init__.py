"""memopt: memory-efficient optimizers (Adafactor, CAME, LOMO, AdaLomo, Adapprox) as plain
``torch.optim.Optimizer`` subclasses. See ALGORITHMS in the docs for the numerical contract."""
from .adafactor import Adafactor
from .adalomo import AdaLomo
from .adapprox import Adapprox
from .base import MemoptOptimizer, NonFiniteGradientError
from .came import CAME
from .fused import DynamicLossScaler
from .lomo import Lomo
from .registry import FUSED_BACKWARD, OPTIMIZERS, create_optimizer, optimizer_hparams
from .sharding import TensorParallelSplit, mark_tensor_parallel, tensor_parallel_split

__all__ = [
    "Adafactor", "AdaLomo", "Adapprox", "CAME", "Lomo", "MemoptOptimizer", "NonFiniteGradientError",
    "DynamicLossScaler", "OPTIMIZERS", "FUSED_BACKWARD", "create_optimizer", "optimizer_hparams",
    "TensorParallelSplit", "mark_tensor_parallel", "tensor_parallel_split",
]
__version__ = "0.1.0"
