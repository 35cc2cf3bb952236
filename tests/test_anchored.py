"""The `direction=A` ablation (recipes/anchored.py): the weight is unchanged when anchored, Adam turns an anchored
row's direction less than a plain one in the same steps, the optimizer still puts the rows in the adapters' group,
and `release` gives back plain weights under their usual names."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import hf_topoadapt as hta
from hf_topoadapt.optimizers import is_adapter_parameter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # recipes/ is not installed

from recipes.anchored import anchor_directions, release  # noqa: E402

try:
    from . import models
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    import models


def adapted() -> tuple[hta.TopoModel, list[dict]]:
    base, batches, *_ = models.hf_bert(0)
    config = hta.TopoAdapterConfig(num_adapters=2, modules_to_save=["classifier"], line_search_steps=4)
    return hta.get_topo_model(base, config, calibration_data=batches), batches


def rows(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if n.endswith("topo_down.default")}


def turned(model, batches, steps: int = 5, lr: float = 1e-2) -> float:
    """The smallest cosine of a row to its initial direction after `steps` Adam steps on the calibration batches."""
    start = rows(model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        optimizer.zero_grad()
        model(**batches[step % len(batches)]).loss.backward()
        optimizer.step()
    end = rows(model)
    return min(torch.nn.functional.cosine_similarity(start[n], end[n], dim=1).min().item() for n in start)


def test_anchored_rows_keep_their_weight_turn_less_and_come_back_plain():
    plain, batches = adapted()
    anchored, _ = adapted()
    before = rows(anchored)
    downs = anchor_directions(anchored, 1.0)
    assert len(downs) == 2
    for name, weight in rows(anchored).items():
        torch.testing.assert_close(weight, before[name])
    names = [n for n, p in anchored.named_parameters() if p.requires_grad and ".topo_down." in n]
    assert any("original0" in n for n in names) and all(is_adapter_parameter(n) for n in names)
    assert turned(anchored, batches) > turned(plain, batches)
    trained = rows(anchored)
    release(downs)
    for name, weight in rows(anchored).items():
        torch.testing.assert_close(weight, trained[name])
    assert not any("parametrizations" in n for n in anchored.state_dict())


def test_anchoring_refuses_a_bad_scale_and_a_model_without_topo_layers():
    model, _ = adapted()
    with pytest.raises(ValueError, match="direction scale must be positive"):
        anchor_directions(model, 0.0)
    base, *_ = models.hf_bert(0)
    with pytest.raises(ValueError, match="no topo layers"):
        anchor_directions(base, 1.0)
