"""Growing networks during training (METHOD.md section 7): schedules, baselines, checkpoints, models, and the
progressive growth of a TopoModel's peft adapter during fine-tuning."""

from .callback import TopoGrowthCallback
from .grow import METHODS, Grower, GrowthConfig, count_parameters, evaluate, grow
from .models import GrowableModel, GrowthOutput, ResidualCNN, ResidualMLP, SmallViT, residual_layer
from .state import extend_optimizer, load_checkpoint, rebuild, save_checkpoint
from .topo_model import TopoModelGrower, head_only_topo_model, make_grower, rebuild_topo_model

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
    "TopoModelGrower",
    "count_parameters",
    "evaluate",
    "extend_optimizer",
    "grow",
    "head_only_topo_model",
    "load_checkpoint",
    "make_grower",
    "rebuild",
    "rebuild_topo_model",
    "residual_layer",
    "save_checkpoint",
]
