"""Positions ranked over several draws of the new, untrained head (the `heads=K` lever).

Why: the adjoints a position's score is built from pass through the classifier, and in fine-tuning that classifier
is new and random. On EfficientNet the same seed's calibration examples give another top three under almost every
other draw of the head (6 draws of seeds 0-9), so which positions a run gets is mostly its head's noise, and the
seeds whose draw picked the last, widest blocks (where the budget buys a few neurons) tested lowest. Averaging each
position's score over K draws (each draw's scores divided by its best, so no draw's scale dominates) ranks positions
by what they offer under any head; the layers are then placed and initialised as usual, with the run's own head.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def redraw_(module: nn.Module, generator: torch.Generator) -> None:
    """Every parameter of `module` drawn again from a normal of its own standard deviation (a zero bias stays zero):
    another head from the distribution the model's own initialisation drew from, for a normal one (transformers'
    classifiers), and of the same scale for a uniform one (torch's Linear)."""
    for parameter in module.parameters():
        noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
        parameter.copy_(noise.to(parameter.device) * parameter.float().std().to(parameter.dtype))


def normalised(values: dict[str, float]) -> dict[str, float]:
    """Scores divided by the best one (left as they are when no position lowers the loss)."""
    best = max(values.values())
    return {name: value / best for name, value in values.items()} if best > 0 else dict(values)


def head_averaged_order(model: nn.Module, calibration: list[dict], head: str, config, draws: int, seed: int):
    """The candidates of `config` (a TopoAdapterConfig) best first by their normalised score averaged over the run's
    own head and draws - 1 others, and each draw's scores. The model comes back unchanged."""
    from hf_topoadapt.locate import config_positions
    from hf_topoadapt.scoring import score_round

    if draws < 1:
        raise ValueError(f"head draws must be >= 1, got {draws}")
    scoring = config.scoring_config()
    names = [p.name for p in config_positions(model, scoring, named=config.target_modules)]
    scoring = config.scoring_config(positions=names)
    module = model.get_submodule(head)
    original = {k: v.detach().clone() for k, v in module.state_dict().items()}
    generator = torch.Generator().manual_seed(10_000 + seed)
    per_draw: list[dict[str, float]] = []
    try:
        for draw in range(draws):
            if draw:
                redraw_(module, generator)
            scored = score_round(model, calibration, scoring)
            per_draw.append({s.name: float(s.ranking_value) for s in scored.scores})
    finally:
        module.load_state_dict(original)
    shares = [normalised(values) for values in per_draw]
    mean = {name: sum(share[name] for share in shares) / draws for name in per_draw[0]}
    return sorted(mean, key=lambda name: -mean[name]), per_draw
