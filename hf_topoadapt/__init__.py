"""hf_topoadapt: where to add depth to a network and how to initialise it, from the topological
derivative of the loss (arXiv 2502.06885)."""

from .activations import InadmissibleActivationError, SiLUTanh, check_activation
from .config import ScoringConfig
from .insertion import InsertionRecord, insert_layer
from .layers import TopoAdapter
from .locate import PositionsNotFoundError
from .scoring import PositionScore, score_positions
from .sensitivity.objective import CalibrationDataError

__version__ = "0.1.0"

__all__ = [
    "CalibrationDataError",
    "InadmissibleActivationError",
    "InsertionRecord",
    "PositionScore",
    "PositionsNotFoundError",
    "ScoringConfig",
    "SiLUTanh",
    "TopoAdapter",
    "check_activation",
    "insert_layer",
    "score_positions",
]
