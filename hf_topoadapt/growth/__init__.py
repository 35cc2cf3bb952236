"""Growing networks during training (METHOD.md section 7): schedules, baselines, checkpoints, models."""

from .callback import TopoGrowthCallback
from .grow import METHODS, Grower, GrowthConfig, count_parameters, evaluate, grow
from .models import GrowableModel, GrowthOutput, ResidualCNN, ResidualMLP, SmallViT, residual_layer
from .state import extend_optimizer, load_checkpoint, rebuild, save_checkpoint

__all__ = [
    "METHODS",
    "GrowableModel",
    "Grower",
    "GrowthConfig",
    "GrowthOutput",
    "ResidualCNN",
    "ResidualMLP",
    "SmallViT",
    "TopoGrowthCallback",
    "count_parameters",
    "evaluate",
    "extend_optimizer",
    "grow",
    "load_checkpoint",
    "rebuild",
    "residual_layer",
    "save_checkpoint",
]
