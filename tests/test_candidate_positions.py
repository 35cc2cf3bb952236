"""Which positions compete: `exclude_positions` (peft's exclude_modules, for positions) through position finding,
scoring, get_topo_model, save / load and growth of a TopoModel, bad names being clear errors; and
`include_embeddings`, off by default for adapters (chosen on validation) and on for ScoringConfig (the paper's)."""

from __future__ import annotations

import pytest
import torch
from models import hf_bert

import hf_topoadapt as hta
from hf_topoadapt.growth import GrowthConfig, TopoModelGrower, head_only_topo_model
from hf_topoadapt.locate import PositionsNotFoundError, find_positions
from hf_topoadapt.scoring import score_positions


def test_excluded_positions_are_dropped_and_the_others_keep_their_depth():
    model = hf_bert(0)[0]
    every = find_positions(model)
    kept = find_positions(model, exclude=["embeddings", "head_input"])
    assert [p.name for p in kept] == [p.name for p in every if p.name not in ("embeddings", "head_input")]
    assert [p.index for p in kept] == [p.index for p in every if p.name not in ("embeddings", "head_input")]
    # named positions are unaffected by an exclusion elsewhere
    assert [p.name for p in find_positions(model, positions=["head_input"], exclude=["embeddings"])] == ["head_input"]


def test_bad_exclusions_are_clear_errors():
    model = hf_bert(0)[0]
    with pytest.raises(PositionsNotFoundError, match=r"\['embedding'\], which are not candidate positions.*embeddings"):
        find_positions(model, exclude=["embedding"])
    with pytest.raises(ValueError, match=r"\['embeddings'\] are both in positions and in exclude_positions"):
        find_positions(model, positions=["embeddings"], exclude=["embeddings"])
    with pytest.raises(PositionsNotFoundError, match="leaves no position to score"):
        find_positions(model, exclude=[p.name for p in find_positions(model)])
    with pytest.raises(ValueError, match="exclude_positions must be a list of position names"):
        hta.ScoringConfig(exclude_positions=[0])
    assert hta.TopoAdapterConfig(exclude_positions="embeddings").exclude_positions == ["embeddings"]
    assert hta.ScoringConfig(exclude_positions=[]).exclude_positions is None


def test_scoring_and_get_topo_model_never_choose_an_excluded_position(tmp_path):
    model, batches, *_ = hf_bert(0)
    names = {s.name for s in score_positions(model, batches, hta.ScoringConfig(exclude_positions=["embeddings"]))}
    assert names and "embeddings" not in names
    config = hta.TopoAdapterConfig(
        num_adapters=3, exclude_positions=["embeddings"], modules_to_save=["classifier"], line_search_steps=4
    )
    adapted = hta.get_topo_model(hf_bert(0)[0], config, calibration_data=batches)
    chosen = list(adapted.peft_config["default"].adapter_shapes)
    assert chosen and "embeddings" not in chosen
    assert "embeddings" not in {s["name"] for s in adapted.topo_report.scores}
    adapted.save_pretrained(str(tmp_path))
    loaded = hta.TopoModel.from_pretrained(hf_bert(0)[0], str(tmp_path))
    assert loaded.peft_config["default"].exclude_positions == ["embeddings"]
    adapted.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(adapted(**batches[0]).logits, loaded(**batches[0]).logits)


def test_growth_of_a_topo_model_never_inserts_at_an_excluded_position():
    _, batches, *_ = hf_bert(0)
    config = hta.TopoAdapterConfig(
        modules_to_save=["classifier"], exclude_positions=["embeddings", "bert.encoder.layer.0"], line_search_steps=4
    )
    model = head_only_topo_model(hf_bert(0)[0], config)
    grower = TopoModelGrower(model, GrowthConfig(schedule=[1]))
    inserted = []
    for _ in range(4):
        entry = grower.grow_now(batches, epoch=1.0)
        if not entry["accepted"]:
            break
        inserted.append(entry["position"])
    assert inserted and not {"embeddings", "bert.encoder.layer.0"} & set(inserted)


def test_adapters_skip_the_embedding_output_by_default_unless_asked_for_it():
    assert hta.ScoringConfig().include_embeddings and not hta.TopoAdapterConfig().include_embeddings
    model, batches, *_ = hf_bert(0)
    every = [p.name for p in find_positions(model)]
    skipped = find_positions(model, include_embeddings=False)
    assert [p.name for p in skipped] == every[1:] and every[0] == "embeddings"
    assert [p.index for p in skipped] == list(range(1, len(every)))  # the others keep their depth
    config = hta.TopoAdapterConfig(num_adapters=3, modules_to_save=["classifier"], line_search_steps=4)
    adapted = hta.get_topo_model(model, config, calibration_data=batches)
    assert "embeddings" not in {s["name"] for s in adapted.topo_report.scores}
    assert "embeddings" not in config.adapter_shapes
    named = hta.TopoAdapterConfig(target_modules=["embeddings"], modules_to_save=["classifier"], line_search_steps=4)
    hta.get_topo_model(hf_bert(0)[0], named, calibration_data=batches)  # named: it competes whatever the default
    assert list(named.adapter_shapes) == ["embeddings"]
    with_it = hta.TopoAdapterConfig(include_embeddings=True, exclude_positions=["head_input"])
    assert "embeddings" in {s.name for s in score_positions(hf_bert(0)[0], batches, with_it.scoring_config())}
