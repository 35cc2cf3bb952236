"""Settings for scoring positions and inserting layers.

`ScoringConfig` is a plain dataclass; any object with the same attribute names (such as the PEFT-style
`TopoAdapterConfig`) can be passed wherever a `ScoringConfig` is expected: `ScoringConfig.from_any`
picks the fields it knows.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig

from .activations import ACTIVATIONS

SOLVERS = ("auto", "exact", "lanczos")
DIRECTIONS = ("coordinate", "optimized")


@dataclass
class ScoringConfig:
    block_path: str | None = field(
        default=None,
        metadata={
            "help": "Dotted path of the model's block list (e.g. 'encoder.layers'); None finds it automatically."
        },
    )
    positions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Only these positions compete: module names after which a layer may go, and/or 'embeddings'. "
            "None means every position found."
        },
    )
    include_head: bool = field(
        default=True, metadata={"help": "Let positions inside an MLP head (nn.Sequential with >= 2 Linear) compete."}
    )
    head_path: str | None = field(
        default=None, metadata={"help": "Dotted path of the head; None tries classifier, head, fc, _fc, score."}
    )
    activation: Any = field(
        default="silu_tanh",
        metadata={
            "help": "Admissible activation of the new layer: 'silu_tanh' (2*SiLU - tanh), 'half_square' or a module."
        },
    )
    kernel_size: int = field(default=3, metadata={"help": "Odd kernel size of the conv layer inserted in a CNN."})
    solver: str = field(
        default="auto",
        metadata={
            "help": "'exact' sums every (q x q) block and calls eigh; 'lanczos' is matrix-free on a token "
            "subsample; 'auto' is exact when q <= exact_max_features."
        },
    )
    exact_max_features: int = field(default=128, metadata={"help": "Largest q = d + 1 solved exactly under 'auto'."})
    exact_max_entries: int = field(
        default=2**22,
        metadata={
            "help": "'auto' is also exact, on every token, when the blocks hold at most this many numbers "
            "(d_out * q^2): narrow conv layers with many pixels, where a token subsample would inflate the top "
            "eigenvalue (the largest eigenvalue of a noisy estimate is biased upwards) and favour them unfairly."
        },
    )
    max_tokens: int = field(
        default=8192,
        metadata={
            "help": "Cap on tokens kept per position for the matrix-free solver (uniform subsample, reweighted)."
        },
    )
    lanczos_screen_iterations: int = field(default=8, metadata={"help": "Lanczos steps run on every block."})
    lanczos_refine_iterations: int = field(default=48, metadata={"help": "Lanczos steps on the best blocks."})
    lanczos_refine_rows: int = field(default=8, metadata={"help": "How many blocks get the longer Lanczos run."})
    eps_s: float = field(
        default=0.5, metadata={"help": "Keep neurons whose eigenvalue is >= (1 - eps_s) * the largest one."}
    )
    max_neurons: int | None = field(default=16, metadata={"help": "Cap on neurons of one inserted layer."})
    neurons: int | None = field(
        default=None,
        metadata={"help": "Fixed neurons per layer (the top eigenpairs with a positive eigenvalue); None: eps_s rule."},
    )
    directions: str = field(
        default="coordinate",
        metadata={"help": "'coordinate': the paper's layer (output axes); 'optimized': METHOD.md section 5."},
    )
    optimize_iterations: int = field(default=20, metadata={"help": "Alternating-ascent steps per optimised neuron."})
    threshold: float = field(
        default=0.0, metadata={"help": "Insert only where the largest eigenvalue exceeds this value."}
    )
    line_search_start: float = field(
        default=1e-3,
        metadata={"help": "First step: the eps whose predicted loss decrease is this fraction of the loss."},
    )
    line_search_growth: float = field(default=2.0, metadata={"help": "Factor between consecutive steps."})
    line_search_steps: int = field(
        default=8,
        metadata={"help": "Steps per sign (the last one predicts a decrease ~16x the loss, far past the model)."},
    )
    compute_dtype: torch.dtype | str | None = field(
        default=None,
        metadata={"help": "dtype of the numerics: None is float64 for a float64 model and float32 otherwise."},
    )
    eval_mode: bool = field(
        default=True, metadata={"help": "Score in eval mode (no dropout); the model's own mode is restored after."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the token subsample and the Lanczos start vectors."})
    progress: bool = field(default=False, metadata={"help": "Show tqdm progress bars."})

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.directions!r}")
        if not 0.0 <= self.eps_s < 1.0:
            raise ValueError(f"eps_s must be in [0, 1), got {self.eps_s}")
        if self.neurons is not None and self.neurons < 1:
            raise ValueError(f"neurons must be >= 1 or None (eps_s rule), got {self.neurons}")
        if self.max_neurons is not None and self.max_neurons < 1:
            raise ValueError(f"max_neurons must be >= 1 or None, got {self.max_neurons}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")
        if self.exact_max_entries < 0:
            raise ValueError(f"exact_max_entries must be >= 0, got {self.exact_max_entries}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.line_search_start <= 0 or self.line_search_growth <= 1 or self.line_search_steps < 1:
            raise ValueError(
                "line search needs line_search_start > 0, line_search_growth > 1 and line_search_steps >= 1; got "
                f"{self.line_search_start}, {self.line_search_growth}, {self.line_search_steps}"
            )
        if isinstance(self.compute_dtype, str):
            dtype = getattr(torch, self.compute_dtype, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise ValueError(
                    f"compute_dtype {self.compute_dtype!r} is not a torch floating dtype: use 'float32' or 'float64'"
                )
            self.compute_dtype = dtype

    def neuron_rule(self) -> tuple[float, int | None]:
        """(eps_s, cap on neurons) for choosing a layer's neurons: a fixed m takes the best m positive ones."""
        return (1.0, self.neurons) if self.neurons is not None else (self.eps_s, self.max_neurons)

    @classmethod
    def from_any(cls, config: Any) -> ScoringConfig:
        if config is None:
            return cls()
        if type(config) is cls:
            return config
        names = {f.name for f in dataclasses.fields(cls)}
        if isinstance(config, dict):
            unknown = set(config) - names
            if unknown:
                raise ValueError(f"unknown scoring settings {sorted(unknown)}; known: {sorted(names)}")
            return cls(**config)
        return cls(**{name: getattr(config, name) for name in names if hasattr(config, name)})


TOPO_PEFT_TYPE = "TOPO"
INITS = ("eigen", "random")


@dataclass
class _TopoAdapterFields:
    num_adapters: int = field(default=1, metadata={"help": "How many layers to insert: at the top-k ranked positions."})
    train_up: bool = field(
        default=False,
        metadata={"help": "Train the output directions U too (a superset of the paper, which keeps them fixed)."},
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Fixed-positions mode: insert at exactly these positions and skip ranking. Filled in with the "
            "chosen positions after get_topo_model, so a saved adapter loads at the same places."
        },
    )
    init: str = field(
        default="eigen",
        metadata={
            "help": "'eigen': eigenvector initialisation with a line-searched step; 'random': small random rows."
        },
    )
    init_scale: float = field(default=1e-2, metadata={"help": "Std of the 'random' initialisation."})
    adapter_shapes: dict | None = field(
        default=None,
        metadata={"help": "Filled in by get_topo_model: {position: {width, neurons, layout, where, module}}."},
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. the new head."}
    )
    calibration_batches: int | None = field(
        default=None, metadata={"help": "Use at most this many calibration batches (None: all)."}
    )
    topo_version: str = field(default="", metadata={"help": "hf_topoadapt version that wrote this config."})


@dataclass
class TopoAdapterConfig(PeftConfig, _TopoAdapterFields, ScoringConfig):
    """PEFT configuration of topological-derivative adapters (peft_type "TOPO").

    Every `ScoringConfig` field (where layers may go, solver, eps_s rule, line search) is available and
    saved in adapter_config.json, plus how many layers to insert and how they train.
    """

    def __post_init__(self) -> None:
        PeftConfig.__post_init__(self)
        self.peft_type = TOPO_PEFT_TYPE
        if not isinstance(self.activation, str):
            raise ValueError(
                "TopoAdapterConfig.activation must be a name (it is saved to JSON): one of "
                f"{sorted(ACTIVATIONS)}; pass a custom module to ScoringConfig / insert_layer instead"
            )
        if isinstance(self.compute_dtype, torch.dtype):
            self.compute_dtype = str(self.compute_dtype).removeprefix("torch.")
        if self.num_adapters < 1:
            raise ValueError(f"num_adapters must be >= 1, got {self.num_adapters}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is an empty list: name positions, or pass None to rank them all")
        self.scoring_config()  # validates the shared fields

    def scoring_config(self, **overrides) -> ScoringConfig:
        """The scoring and insertion settings as a ScoringConfig."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(ScoringConfig)}
        return ScoringConfig(**{**values, **overrides})

    @classmethod
    def check_kwargs(cls, **kwargs):
        """Loading: a config written by a newer hf_topoadapt, or with settings this version does not know, is an
        error rather than a silent drop (peft's default for unknown keys)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ValueError(
                f"adapter_config.json has settings this hf_topoadapt does not know: {unknown}. It was probably written "
                f"by a newer version ({kwargs.get('topo_version') or 'unknown'}); upgrade hf_topoadapt to load it"
            )
        return kwargs
