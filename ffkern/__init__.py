"""ffkern: Forward-Forward training with fused Triton kernels and a closed-form CPU reference.

The public API::

    from ffkern import FFConfig, FFNetwork, Trainer, load_dataset, get_backend

    dataset = load_dataset("digits")
    trainer = Trainer(FFConfig(layers=(500, 500), epochs=20), dataset, backend="auto")
    history = trainer.fit().history
"""

from ffkern.backends import Backend, get_backend
from ffkern.config import FFConfig
from ffkern.data import Dataset, load_dataset
from ffkern.model import FFNetwork
from ffkern.optim import OptimConfig
from ffkern.reference import LayerObjective
from ffkern.trainer import Trainer, TrainResult

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "Dataset",
    "FFConfig",
    "FFNetwork",
    "LayerObjective",
    "OptimConfig",
    "TrainResult",
    "Trainer",
    "get_backend",
    "load_dataset",
]
