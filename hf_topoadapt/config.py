"""Settings for scoring positions and inserting layers.

`ScoringConfig` is a plain dataclass; any object with the same attribute names (such as the PEFT-style
`TopoAdapterConfig`) can be passed wherever a `ScoringConfig` is expected: `ScoringConfig.from_any`
picks the fields it knows.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
from peft import PeftConfig

from .activations import ACTIVATIONS
from .sensitivity.directions import OPTIMIZE_SOLVERS

SOLVERS = ("auto", "exact", "lanczos")
SCREEN_TOKENS = 8192
DIRECTIONS = ("coordinate", "optimized")
RANK_BY = ("eigenvalue", "per_token")
COMPUTE_DTYPES = (torch.float32, torch.float64)


def check_whole(name: str, value, minimum: int, optional: bool = False, why: str = "") -> int | None:
    """`value` as an int >= minimum (None allowed when optional), else a ValueError naming the setting."""
    if value is None and optional:
        return None
    allowed = f"a whole number >= {minimum}" + (" or None" if optional else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}" + (" or None" if optional else "") + f"{why}, got {value}")
    return int(value)


def check_real(name: str, value, low: float | None = None, strict: bool = False, why: str = "") -> float:
    """`value` as a finite float, above `low` (strictly when `strict`) if given, else a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {low}{why}, got {value}")
    return float(value)


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
    exclude_positions: list[str] | None = field(
        default=None,
        metadata={
            "help": "Positions that never compete (names as in `positions`, e.g. ['embeddings']): the rest of the "
            "model's candidates are scored. peft's exclude_modules, for positions."
        },
    )
    include_embeddings: bool = field(
        default=True,
        metadata={
            "help": "Let the input of the first block (position 'embeddings': the embedding or stem output) compete."
        },
    )
    include_head: bool = field(
        default=True,
        metadata={
            "help": "Let positions inside an MLP head (nn.Sequential with >= 2 Linear) compete, or for a single-Linear "
            "classifier its input (the pooled features, position 'head_input')."
        },
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
    kernel_size: int = field(
        default=3,
        metadata={
            "help": "Odd kernel size of the conv layer inserted in a CNN; smaller where the calibration feature maps "
            "are, unless shrink_kernel=False."
        },
    )
    shrink_kernel: bool = field(
        default=True,
        metadata={
            "help": "Build a smaller kernel where the calibration feature maps are smaller than kernel_size "
            "(sensitivity.features.effective_kernel): with 'same' padding the taps past the map's extent read only "
            "padding and never get a gradient, so on a 1 x 1 map (a CNN's last stage at a small input) a 3 x 3 conv "
            "is a 1 x 1 conv with nine times the trainable parameters. The scores are the same either way. False: "
            "kernel_size everywhere, as adapters made before this option were."
        },
    )
    solver: str = field(
        default="auto",
        metadata={
            "help": "'exact' sums every (q x q) block and calls eigh; 'lanczos' is matrix-free on the captured "
            "tokens; 'auto' is exact when q <= exact_max_features."
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
    max_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Optional cap on tokens kept per position for the matrix-free solver (uniform subsample, "
            "reweighted). None: every token while the pairs fit the memory budget (pair_memory_fraction, "
            "cpu_pair_memory); a subsample inflates the top eigenvalue (METHOD.md section 8)."
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
    optimize_solver: str = field(
        default="dense",
        metadata={
            "help": "Top eigenpair of each ascent step: 'dense' forms the (q x q) mixture and solves it; "
            "'matrix_free' runs warm-started Lanczos on products with the captured token pairs; 'auto' does so "
            "only where the dense path would run Lanczos anyway (more than 512 features), LAPACK below."
        },
    )
    optimize_tol: float = field(
        default=1e-10,
        metadata={"help": "An optimised neuron's ascent stops once a step gains less than this (relative)."},
    )
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
    step_decrease: float | None = field(
        default=None,
        metadata={
            "help": "Skip the line search: the layer takes the step whose second-order predicted decrease, "
            "(eps^2 / 2) * gain, is this fraction of the calibration loss, in the sign whose loss is lower (two "
            "forward passes), kept unless it raises the loss; step_scale does not apply. The step then depends on "
            "the gain alone, not on where a bumpy loss curve has its lowest grid point. None: the line search, "
            "which did better on the recipes' validation (benchmarks/results/transfer_training.md, round 16: "
            "-1.9 points at 0.01 and -2.5 at 0.001, MiniLM -7 and -5)."
        },
    )
    rank_by: str = field(
        default="eigenvalue",
        metadata={
            "help": "What positions compete by: 'eigenvalue' (the paper: the loss decrease of the best unit layer) or "
            "'per_token' (that decrease divided by the tokens the position sees: a CNN's early feature maps have "
            "many more positions per image than its late ones, and the plain sum favours them by count)."
        },
    )
    step_scale: float = field(
        default=1.0,
        metadata={
            "help": "The inserted layer takes this fraction of the line-searched step eps (1: the paper's step). "
            "The line search minimises the calibration loss, which on a few dozen examples is the training loss: "
            "a smaller step leaves more of the fit to training."
        },
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
    pair_memory_fraction: float = field(
        default=0.5,
        metadata={
            "help": "On CUDA: share of the free device memory that the captured (z, p) pairs of all positions may "
            "take together; every token is kept while they fit, a uniform subsample beyond."
        },
    )
    cpu_pair_memory: int = field(
        default=2 * 2**30,
        metadata={"help": "Elsewhere (CPU): bytes the (z, p) pairs of all positions may take together."},
    )
    screen_tokens: int | None = field(
        default=SCREEN_TOKENS,
        metadata={
            "help": "The short Lanczos run that ranks a position's blocks uses a uniform sample of at most this many "
            "tokens; the best blocks' eigenpairs are then computed on every kept token. None: screen on every token."
        },
    )
    tf32_products: bool = field(
        default=True,
        metadata={
            "help": "On CUDA, Lanczos products in TF32 with float32 accumulation; the eigenvalues are re-measured "
            "with full float32 products."
        },
    )
    batch_positions: bool | None = field(
        default=None,
        metadata={
            "help": "Solve positions of one shape in one batched Lanczos run (fewer kernel launches). None: on "
            "accelerators only (on the CPU each position's result then stays bitwise independent of the others)."
        },
    )
    crossfit: bool = field(
        default=False,
        metadata={
            "help": "Rank positions and choose neurons by cross-fitted values (METHOD.md section 8): each output "
            "row's top eigenvector from one half of the calibration examples, measured on the other half, both "
            "ways. The plain top eigenvalue of a few dozen examples is biased upwards by noise; the initial "
            "directions still come from all the examples, and the report keeps both estimates."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.exclude_positions, str):
            self.exclude_positions = [self.exclude_positions]
        if self.exclude_positions is not None:
            if not all(isinstance(name, str) for name in self.exclude_positions):
                raise ValueError(f"exclude_positions must be a list of position names, got {self.exclude_positions!r}")
            self.exclude_positions = list(self.exclude_positions) or None
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {self.rank_by!r}")
        if self.directions not in DIRECTIONS:
            raise ValueError(f"directions must be one of {DIRECTIONS}, got {self.directions!r}")
        self.eps_s = check_real("eps_s", self.eps_s, 0.0)
        if self.eps_s >= 1.0:
            raise ValueError(f"eps_s must be in [0, 1) (0 keeps only the top neuron), got {self.eps_s}")
        self.neurons = check_whole("neurons", self.neurons, 1, optional=True, why=" (None: the eps_s rule)")
        self.max_neurons = check_whole("max_neurons", self.max_neurons, 1, optional=True, why=" (None: no cap)")
        self.kernel_size = check_whole("kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number ('same' padding), got {self.kernel_size}")
        self.exact_max_features = check_whole(
            "exact_max_features", self.exact_max_features, 0, why=" (0: never exact by width under 'auto')"
        )
        self.exact_max_entries = check_whole("exact_max_entries", self.exact_max_entries, 0)
        self.max_tokens = check_whole("max_tokens", self.max_tokens, 1, optional=True, why=" (None: a memory budget)")
        for name in ("lanczos_screen_iterations", "lanczos_refine_iterations"):
            setattr(self, name, check_whole(name, getattr(self, name), 1, why=" (a Lanczos run needs a step)"))
        self.lanczos_refine_rows = check_whole(
            "lanczos_refine_rows", self.lanczos_refine_rows, 1, why=" (the best block is always refined)"
        )
        self.optimize_iterations = check_whole(
            "optimize_iterations", self.optimize_iterations, 0, why=" (0 keeps the best axis)"
        )
        if self.optimize_solver not in OPTIMIZE_SOLVERS:
            raise ValueError(f"optimize_solver must be one of {OPTIMIZE_SOLVERS}, got {self.optimize_solver!r}")
        self.optimize_tol = check_real("optimize_tol", self.optimize_tol, 0.0)
        self.threshold = check_real(
            "threshold", self.threshold, 0.0, why=" (a layer lowers the loss to second order only where the "
            "largest eigenvalue is positive)"
        )  # fmt: skip
        self.seed = check_whole("seed", self.seed, -(2**63))
        for name in ("line_search_start", "line_search_growth"):
            setattr(self, name, check_real(name, getattr(self, name)))
        self.line_search_steps = check_whole("line_search_steps", self.line_search_steps, 1)
        if self.step_decrease is not None:
            self.step_decrease = check_real(
                "step_decrease", self.step_decrease, 0.0, strict=True, why=" (None: the line search)"
            )
        self.step_scale = check_real(
            "step_scale", self.step_scale, 0.0, strict=True, why=" (1: the line search's step)"
        )
        if self.step_scale > 1.0:
            raise ValueError(
                f"step_scale must be in (0, 1]: a fraction of the step that minimised the calibration loss, got "
                f"{self.step_scale}"
            )
        if self.line_search_start <= 0 or self.line_search_growth <= 1:
            raise ValueError(
                "line search needs line_search_start > 0, line_search_growth > 1 and line_search_steps >= 1; got "
                f"{self.line_search_start}, {self.line_search_growth}, {self.line_search_steps}"
            )
        dtype = self.compute_dtype
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype, dtype)
        if dtype is not None and dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype {self.compute_dtype!r} is not supported: use 'float32', 'float64' or None (the "
                "solvers need float32 or float64 whatever the model's dtype)"
            )
        self.compute_dtype = dtype
        self.pair_memory_fraction = check_real("pair_memory_fraction", self.pair_memory_fraction, 0.0, strict=True)
        if self.pair_memory_fraction > 1.0:
            raise ValueError(f"pair_memory_fraction must be in (0, 1], got {self.pair_memory_fraction}")
        self.cpu_pair_memory = check_whole("cpu_pair_memory", self.cpu_pair_memory, 1)
        self.screen_tokens = check_whole(
            "screen_tokens", self.screen_tokens, 1, optional=True, why=" (None: screen on every token)"
        )
        if not isinstance(self.tf32_products, bool):
            raise ValueError(f"tf32_products must be True or False, got {self.tf32_products!r}")
        if not isinstance(self.crossfit, bool):
            raise ValueError(f"crossfit must be True or False, got {self.crossfit!r}")
        if self.batch_positions not in (None, True, False):
            raise ValueError(f"batch_positions must be True, False or None (auto), got {self.batch_positions!r}")

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
    # Adapters default to optimised output directions, positions after the embeddings and a tenth of the line-searched
    # step: chosen on validation over the paper's layer and the other levers (benchmarks/results/transfer_levers.md,
    # transfer_training.md); ScoringConfig (insert_layer, growth of networks) keeps the paper's.
    include_embeddings: bool = field(
        default=False,
        metadata={
            "help": "Let the embedding (stem) output compete. Off by default: a layer there was the worst or "
            "near-worst position in the recipes' diagnostics, and skipping it was the one lever that helped on "
            "validation."
        },
    )
    directions: str = field(
        default="optimized",
        metadata={"help": "'optimized' (default): METHOD.md section 5; 'coordinate': the paper's layer (output axes)."},
    )
    step_scale: float = field(
        default=0.1,
        metadata={
            "help": "The inserted layers take this fraction of the line-searched step (1: the paper's). 0.1 by "
            "default: the full step fits the calibration examples, in fine-tuning the training examples, through the "
            "new random head; a tenth keeps the positions and directions and leaves the fit to training, which gained "
            "on validation over the recipes (benchmarks/results/transfer_training.md, round 4). Growing a TopoModel "
            "takes GrowthConfig.step_scale instead (1: a tenth lost there, round 5)."
        },
    )
    optimize_solver: str = field(
        default="auto",
        metadata={
            "help": "Top eigenpair of each step of the optimised directions' ascent: 'auto' (default) runs Lanczos on "
            "products with the captured token pairs above 512 features, where 'dense' runs it on a formed (q x q) "
            "matrix, and LAPACK below; 'dense' forms the matrix everywhere; 'matrix_free' never does. 'auto' cost "
            "no validation accuracy over the recipes (benchmarks/results/transfer_training.md, round 6)."
        },
    )
    train_up: bool = field(
        default=False,
        metadata={"help": "Train the output directions U too (a superset of the paper, which keeps them fixed)."},
    )
    topo_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout probability on each layer's input to D while training (peft's lora_dropout, for the "
            "inserted layers): the residual stream itself is never dropped, and scoring runs without it."
        },
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
        metadata={
            "help": "Filled in by get_topo_model: {position: {width, neurons, layout, where, module, kernel_size}} "
            "(kernel_size: the conv on an image stream, smaller than the config's where the calibration maps are)."
        },
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. the new head."}
    )
    calibration_batches: int | None = field(
        default=None, metadata={"help": "Use at most this many calibration batches (None: all)."}
    )
    head_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Before scoring, train modules_to_save (the new head) alone for this many AdamW steps on the "
            "calibration data, so the adjoints the scores are built from pass through a fitted readout instead "
            "of a random one (METHOD.md section 8). 0: no warm-up."
        },
    )
    head_warmup_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the head warm-up."})
    neuron_budget: int | None = field(
        default=None,
        metadata={
            "help": "Trainable parameters the inserted layers may take together (modules_to_save not counted). "
            "Positions and neurons are then chosen by value per parameter: every candidate neuron's eigenvalue "
            "(cross-fitted with crossfit=True) over its cost (d + 1 on a token stream, C k^2 + 1 on a feature map, "
            "+ d with train_up), best first while they fit, at most num_adapters positions and max_neurons "
            "neurons each. None: num_adapters positions sized by the eps_s rule or `neurons`. On the recipes' "
            "validation, with max_neurons=64, it gained on EfficientNet and lost on MiniLM (benchmarks/results/"
            "transfer_training.md, round 17), and on a CNN it can leave much of a large budget unspent: the cheapest "
            "positions take it first and hold at most their width in neurons."
        },
    )
    fill_budget: bool = field(
        default=False,
        metadata={
            "help": "With neuron_budget: when num_adapters positions, each at its width or max_neurons, leave part "
            "of the budget unspent, open further positions for it, best value per parameter first (more than "
            "num_adapters layers). On a CNN the cheapest positions take the budget first and hold few neurons. On "
            "EfficientNet it spent 93-100% of every budget, without gaining on validation above the smallest one "
            "(benchmarks/results/transfer_training.md, round 18)."
        },
    )
    score_once: bool = field(
        default=True,
        metadata={
            "help": "Score every position once and insert at the num_adapters best of that round (each layer still "
            "stepped with the earlier ones in place), instead of scoring again after every insertion (the paper's "
            "greedy rule, False): num_adapters times fewer captures and eigen-solves. The later layers' directions "
            "come from adjoints taken before the earlier layers were inserted, which a step_scale below 1 barely "
            "changes; the positions no longer depend on where the earlier line searches ended. On by default: it "
            "gained on validation over the recipes (benchmarks/results/transfer_training.md, round 15)."
        },
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
        self.num_adapters = check_whole("num_adapters", self.num_adapters, 1)
        self.init_scale = check_real(
            "init_scale", self.init_scale, 0.0, strict=True,
            why=" (the std of init='random': at 0 the new rows get exactly zero gradients and never train)",
        )  # fmt: skip
        self.topo_dropout = check_real("topo_dropout", self.topo_dropout, 0.0)
        if self.topo_dropout >= 1:
            raise ValueError(f"topo_dropout is a probability below 1 (0: no dropout), got {self.topo_dropout}")
        self.calibration_batches = check_whole(
            "calibration_batches", self.calibration_batches, 1, optional=True, why=" (None: all batches)"
        )
        for name in ("score_once", "fill_budget"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.fill_budget and self.neuron_budget is None:
            raise ValueError("fill_budget spends what a neuron_budget leaves unspent: set neuron_budget too")
        self.head_warmup_steps = check_whole("head_warmup_steps", self.head_warmup_steps, 0, why=" (0: no warm-up)")
        self.head_warmup_lr = check_real("head_warmup_lr", self.head_warmup_lr, 0.0, strict=True)
        self.neuron_budget = check_whole(
            "neuron_budget", self.neuron_budget, 1, optional=True, why=" (None: no budget)"
        )
        if self.head_warmup_steps and not self.modules_to_save:
            raise ValueError(
                "head_warmup_steps needs the head to warm up: name it in modules_to_save (e.g. ['classifier'])"
            )
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules is an empty list: name positions, or pass None to rank them all")
        self.exclude_positions = self.scoring_config().exclude_positions  # validates the shared fields (normalised)

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
