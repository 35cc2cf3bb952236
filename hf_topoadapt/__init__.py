"""hf_topoadapt: where to add depth to a network and how to initialise it, from the topological
derivative of the loss (arXiv 2502.06885)."""

from .activations import InadmissibleActivationError, SiLUTanh, check_activation

__version__ = "0.1.0"

from . import growth  # noqa: E402
from .config import ScoringConfig, TopoAdapterConfig  # noqa: E402
from .growth import TopoGrowthCallback  # noqa: E402
from .insertion import InsertionRecord, insert_layer  # noqa: E402
from .layers import TopoAdapter  # noqa: E402
from .locate import PositionsNotFoundError  # noqa: E402
from .model import TopoModel, get_topo_model  # noqa: E402
from .optimizers import create_topo_optimizer  # noqa: E402
from .peft_registry import register as _register_with_peft  # noqa: E402
from .report import TopoReport  # noqa: E402
from .scoring import PositionScore, score_positions  # noqa: E402
from .sensitivity.objective import CalibrationDataError  # noqa: E402

_register_with_peft()

__all__ = [
    "CalibrationDataError",
    "InadmissibleActivationError",
    "InsertionRecord",
    "PositionScore",
    "PositionsNotFoundError",
    "ScoringConfig",
    "SiLUTanh",
    "TopoAdapter",
    "TopoAdapterConfig",
    "TopoGrowthCallback",
    "TopoModel",
    "TopoReport",
    "check_activation",
    "create_topo_optimizer",
    "get_topo_model",
    "growth",
    "insert_layer",
    "score_positions",
]
