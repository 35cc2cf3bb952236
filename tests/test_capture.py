"""Scoring leaves the model exactly as it was (weights, hooks, modes, gradients), also when a forward
pass or the loss raises; frozen and bfloat16 models score; the token cap bounds memory; tokens with a
zero adjoint are dropped."""

from __future__ import annotations

import copy

import pytest
import torch
from models import BUILDERS, ResidualBlock, hf_bert, hf_gpt2, hf_llama, hf_vit, residual_cnn, residual_mlp
from torch import nn
from torch.nn.modules import module as module_globals

import hf_topoadapt as hta
from hf_topoadapt.scoring import score_with_operators
from hf_topoadapt.sensitivity.capture import PairAccumulator, Tap, transform_stream
from hf_topoadapt.sensitivity.objective import CalibrationDataError
from hf_topoadapt.sensitivity.operators import DenseBlocks, TokenPairs

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


class Snapshot:
    """Everything about a model that scoring must leave as it found it."""

    def __init__(self, model: nn.Module):
        self.state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        self.storage = {k: v.data_ptr() for k, v in model.state_dict(keep_vars=True).items()}
        self.dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
        self.hooks = {
            name: {attr: tuple(getattr(module, attr, {}).keys()) for attr in HOOK_DICTS}
            for name, module in model.named_modules()
        }
        self.global_hooks = {attr: tuple(getattr(module_globals, attr).keys()) for attr in GLOBAL_HOOKS}
        self.training = {name: module.training for name, module in model.named_modules()}
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.grads = {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}
        self.modules = [name for name, _ in model.named_modules()]

    def assert_unchanged(self, model: nn.Module) -> None:
        after = Snapshot(model)
        assert after.modules == self.modules
        assert after.state.keys() == self.state.keys()
        for key, value in self.state.items():
            assert torch.equal(after.state[key], value), key
        assert after.storage == self.storage  # same tensors, not copies
        assert after.dtypes == self.dtypes
        assert after.hooks == self.hooks
        assert after.global_hooks == self.global_hooks
        assert after.training == self.training
        assert after.requires_grad == self.requires_grad
        for name, grad in self.grads.items():
            now = after.grads[name]
            assert (grad is None and now is None) or torch.equal(grad, now), name


def outputs(model, batches):
    with torch.no_grad():
        results = []
        for batch in batches:
            out = model(**batch) if isinstance(batch, dict) else model(batch[0])
            results.append(out.logits if hasattr(out, "logits") else out)
        return results


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_unchanged_after_scoring(name):
    model, batches, loss_fn, _, _ = BUILDERS[name]()
    before_outputs = outputs(model, batches)
    snapshot = Snapshot(model)
    scores = hta.score_positions(model, batches, loss_fn=loss_fn)
    assert all(torch.isfinite(torch.tensor(s.eigenvalue)) for s in scores)
    snapshot.assert_unchanged(model)
    for a, b in zip(outputs(model, batches), before_outputs, strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_train_mode_restored_and_dropout_off_while_scoring(solver):
    model, batches, loss_fn, _, _ = hf_bert()
    assert any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
    config = hta.ScoringConfig(solver=solver)
    expected = [s.eigenvalue for s in hta.score_positions(model, batches, config, loss_fn)]  # eval mode
    model.train()
    model.bert.pooler.eval()  # mixed modes come back module by module
    snapshot = Snapshot(model)
    first = [s.eigenvalue for s in hta.score_positions(model, batches, config, loss_fn)]
    second = [s.eigenvalue for s in hta.score_positions(model, batches, config, loss_fn)]
    snapshot.assert_unchanged(model)
    assert model.training and model.bert.encoder.training and not model.bert.pooler.training
    # dropout is off while scoring: deterministic and equal to the eval-mode scores
    assert first == pytest.approx(expected, rel=1e-12)
    assert second == pytest.approx(expected, rel=1e-12)


def test_existing_gradients_untouched():
    model, batches, loss_fn, _, _ = residual_cnn()
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
    snapshot = Snapshot(model)
    hta.score_positions(model, batches, loss_fn=loss_fn)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize("builder", [hf_bert, residual_mlp, residual_cnn], ids=["hf_bert", "residual_mlp", "cnn"])
def test_frozen_parameters_give_the_same_scores(builder):
    model, batches, loss_fn, _, _ = builder()
    expected, _ = score_with_operators(model, batches, None, loss_fn)

    frozen = copy.deepcopy(model).requires_grad_(False)
    snapshot = Snapshot(frozen)
    scores, _ = score_with_operators(frozen, batches, None, loss_fn)
    snapshot.assert_unchanged(frozen)
    assert not any(p.requires_grad for p in frozen.parameters())
    for a, b in zip(scores, expected, strict=True):
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-12)
        torch.testing.assert_close(a.operator.dense(), b.operator.dense(), rtol=1e-12, atol=1e-15)

    # partly frozen: only the layers before the first block
    partial = copy.deepcopy(model)
    first = list(partial.children())[0]
    first.requires_grad_(False)
    snapshot = Snapshot(partial)
    scores, _ = score_with_operators(partial, batches, None, loss_fn)
    snapshot.assert_unchanged(partial)
    for a, b in zip(scores, expected, strict=True):
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-12)


def test_scoring_under_no_grad():
    model, batches, loss_fn, _, _ = hf_gpt2()
    expected = [s.eigenvalue for s in hta.score_positions(model, batches, loss_fn=loss_fn)]
    with torch.no_grad():
        scores = hta.score_positions(model, batches, loss_fn=loss_fn)
        assert not torch.is_grad_enabled()
    assert [s.eigenvalue for s in scores] == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# a forward pass or a loss that raises


class ExplodingBlock(ResidualBlock):
    """A residual block that raises when its input is huge (armed on one block only)."""

    limit = float("inf")

    def forward(self, x):
        if float(x.detach().abs().max()) > self.limit:
            raise RuntimeError("exploding block")
        return super().forward(x)


def exploding_mlp():
    model, batches, loss_fn, _, _ = residual_mlp()
    blocks = nn.ModuleList(ExplodingBlock(6).double() for _ in model.blocks)
    blocks.load_state_dict(model.blocks.state_dict())
    model.blocks = blocks
    blocks[2].limit = 1e3  # the last block raises on a huge input: after the first taps have fired
    huge = (batches[0][0] * 1e6, batches[0][1])
    return model, batches, huge, loss_fn


class LossError(Exception):
    pass


def failing_loss(after_calls: int, loss_fn):
    calls = {"n": 0}

    def loss(outputs, targets):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise LossError("loss failed")
        return loss_fn(outputs, targets)

    return loss


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_hooks_removed_when_the_forward_raises_mid_way(solver):
    model, batches, huge, loss_fn = exploding_mlp()
    model.train()
    model.blocks[1].eval()
    snapshot = Snapshot(model)
    expected = [s.eigenvalue for s in hta.score_positions(model, batches, hta.ScoringConfig(solver=solver), loss_fn)]
    with pytest.raises(RuntimeError, match="exploding block"):
        hta.score_positions(model, [batches[0], huge], hta.ScoringConfig(solver=solver), loss_fn)
    snapshot.assert_unchanged(model)
    # the model still works, and scoring again gives the same numbers
    again = [s.eigenvalue for s in hta.score_positions(model, batches, hta.ScoringConfig(solver=solver), loss_fn)]
    assert again == pytest.approx(expected, rel=1e-12)
    snapshot.assert_unchanged(model)


@pytest.mark.parametrize("after_calls", [0, 1])
def test_hooks_removed_when_the_loss_raises(after_calls):
    model, batches, loss_fn, _, _ = residual_cnn()
    model.train()
    snapshot = Snapshot(model)
    with pytest.raises(LossError):
        hta.score_positions(model, batches, loss_fn=failing_loss(after_calls, loss_fn))
    snapshot.assert_unchanged(model)


def test_hooks_removed_on_non_finite_loss_and_bad_hf_batch():
    model, batches, _, _, _ = hf_bert()
    model.train()
    snapshot = Snapshot(model)
    bad_labels = dict(batches[1], labels=torch.full_like(batches[1]["labels"], -100))  # every label ignored: NaN
    with pytest.raises(CalibrationDataError):
        hta.score_positions(model, [batches[0], bad_labels])
    snapshot.assert_unchanged(model)
    out_of_vocab = dict(batches[1], input_ids=batches[1]["input_ids"] + 1000)
    with pytest.raises((IndexError, RuntimeError)):
        hta.score_positions(model, [batches[0], out_of_vocab])
    snapshot.assert_unchanged(model)


def test_transform_stream_removes_its_hook_on_exception():
    model, batches, loss_fn, _, _ = residual_mlp()
    x = batches[0][0]
    before = model(x)
    for where, module in (("output", model.blocks[1]), ("input", model.blocks[0])):
        snapshot = Snapshot(model)
        tap = Tap("t", module, where)
        with transform_stream(tap, lambda h: h + 1.0):
            assert not torch.equal(model(x), before)
        snapshot.assert_unchanged(model)
        with pytest.raises(ValueError, match="inside"):
            with transform_stream(tap, lambda h: h + 1.0):
                raise ValueError("inside")
        snapshot.assert_unchanged(model)
        assert torch.equal(model(x), before)


# ---------------------------------------------------------------------------------------------------------
# dtypes


def test_bfloat16_model_scores_in_float32():
    model32 = hf_llama()[0].float()
    batches = hf_llama()[1]
    model16 = copy.deepcopy(model32).to(torch.bfloat16)
    snapshot = Snapshot(model16)
    scores16, _ = score_with_operators(model16, batches)
    snapshot.assert_unchanged(model16)
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    scores32, _ = score_with_operators(model32, batches)
    for a, b in zip(scores16, scores32, strict=True):
        assert a.operator.dtype == torch.float32
        assert b.operator.dtype == torch.float32
        assert a.spectrum.eigenvalues.dtype == torch.float32
        assert torch.isfinite(a.operator.dense()).all()
        assert a.eigenvalue > 0
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=0.1), a.name
        top16, top32 = torch.tensor(a.top_eigenvalues[:3]), torch.tensor(b.top_eigenvalues[:3])
        torch.testing.assert_close(top16, top32, rtol=0.1, atol=0.1 * b.eigenvalue)


def test_compute_dtype_setting():
    model, batches, _, _, _ = hf_gpt2()
    model = model.float()
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(compute_dtype="float64"))
    assert all(s.operator.dtype == torch.float64 for s in scores)
    assert all(p.dtype == torch.float32 for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------
# the token cap and tokens with a zero adjoint


def test_token_cap_bounds_the_pairs_kept(monkeypatch):
    model, batches, _, _, _ = hf_gpt2()
    held = []
    original = PairAccumulator.add

    def add(self, state, adjoint):
        original(self, state, adjoint)
        held.append((self.mode, 0 if self.z is None else self.z.shape[0], self.max_tokens))

    monkeypatch.setattr(PairAccumulator, "add", add)
    cap = 7
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="lanczos", max_tokens=cap))
    assert len(held) == 3 * len(batches)  # one add per position per batch
    assert all(mode == "pairs" and 0 < rows <= cap == limit for mode, rows, limit in held)
    for score in scores:
        assert score.tokens == 2 * 3 * 5
        assert score.tokens_used == cap
        assert isinstance(score.operator, TokenPairs)
        assert score.operator.z.shape[0] == cap
        assert score.operator.scale == pytest.approx(2 * 3 * 4 / cap)  # candidates (non-zero adjoint) / kept

    held.clear()
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="exact"))
    assert all(mode == "blocks" and rows == 0 for mode, rows, _ in held)  # no pairs kept: memory d q^2
    assert all(isinstance(s.operator, DenseBlocks) for s in scores)


def last_token_count(batches) -> int:
    return sum(b["input_ids"].numel() for b in batches)


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_zero_adjoint_tokens_dropped_causal_lm(solver):
    """A causal LM's loss never reads the last position's logits, and causal attention keeps that token
    from influencing any other: its adjoint is exactly zero at every position."""
    model, batches, _, _, _ = hf_gpt2()
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(solver=solver))
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    for score in scores:
        assert score.tokens == last_token_count(batches) == 30
        assert score.tokens_used == score.tokens - sequences == 24, (score.name, score.tokens_used)


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
@pytest.mark.parametrize("builder", [hf_bert, hf_vit], ids=["hf_bert", "hf_vit"])
def test_zero_adjoint_tokens_dropped_cls_classifier(builder, solver):
    """A CLS-token classifier reads only token 0 of the last block: only the CLS tokens count there; every
    token counts at earlier positions (attention mixes them)."""
    model, batches, _, _, _ = builder()
    config = hta.ScoringConfig(solver=solver, include_head=False)  # the blocks; the classifier input is tested below
    scores, _ = score_with_operators(model, batches, config)
    sequences = sum(next(iter(b.values())).shape[0] for b in batches)
    tokens = scores[0].tokens
    assert tokens == sequences * (5 if builder is hf_bert else 1 + (8 // 4) ** 2)
    for score in scores[:-1]:
        assert (score.tokens, score.tokens_used) == (tokens, tokens), score.name
    last = scores[-1]
    assert last.tokens == tokens
    assert last.tokens_used == sequences, (last.name, last.tokens_used)


@pytest.mark.parametrize("builder", [hf_bert, hf_vit], ids=["hf_bert", "hf_vit"])
def test_the_classifier_input_counts_one_token_per_example(builder):
    """BERT's classifier reads the pooled vector (one state per example); ViT's reads the [CLS] token of the final
    layernorm's output (one token per example has a non-zero adjoint)."""
    model, batches, _, _, _ = builder()
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="exact"))
    sequences = sum(next(iter(b.values())).shape[0] for b in batches)
    head = scores[-1]
    assert (head.name, head.tokens_used) == ("head_input", sequences)
    assert head.layout == ("vector" if builder is hf_bert else "tokens")
    assert head.tokens == (sequences if builder is hf_bert else scores[0].tokens)


def test_cls_tokens_are_the_pairs_kept():
    model, batches, _, _, _ = hf_bert()
    scores, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="lanczos", include_head=False))
    kept = scores[-1].operator.z[:, :-1]
    with torch.no_grad():
        cls = torch.cat([model(**b, output_hidden_states=True).hidden_states[-1][:, 0] for b in batches])
    assert kept.shape == cls.shape
    # the same rows (the reservoir may reorder them)
    distances = torch.cdist(kept, cls)
    assert float(distances.min(dim=1).values.max()) < 1e-12
    assert torch.unique(distances.argmin(dim=1)).numel() == cls.shape[0]


def test_a_position_scores_the_same_whichever_positions_compete():
    """Greedy top-k insertion rescores a shrinking set of positions: a position's subsample and Lanczos start
    must not depend on the others, or the same position gets a different initialisation."""
    model, batches, loss_fn, _, _ = BUILDERS["hf_gpt2"]()
    config = dict(solver="lanczos", max_tokens=7)
    every = hta.score_positions(model, batches, hta.ScoringConfig(**config), loss_fn)
    for score in every:
        alone = hta.score_positions(model, batches, hta.ScoringConfig(**config, positions=[score.name]), loss_fn)
        assert alone[0].eigenvalue == score.eigenvalue
        assert alone[0].neurons == score.neurons


def test_auto_solves_narrow_wide_feature_positions_exactly_on_every_token():
    """A conv position with q = C k^2 + 1 > exact_max_features but few output channels is cheap to hold exactly;
    a token subsample there would inflate its top eigenvalue (max of a noisy estimate) against exact positions."""
    model, batches, loss_fn, _, _ = residual_cnn()
    narrow = hta.ScoringConfig(exact_max_features=4, max_tokens=16)  # q = 3 * 9 + 1 = 28 > 4
    scores, _ = score_with_operators(model, batches, narrow, loss_fn)
    exact, _ = score_with_operators(model, batches, hta.ScoringConfig(solver="exact"), loss_fn)
    assert all(isinstance(s.operator, DenseBlocks) and s.tokens_used == s.tokens for s in scores)
    assert [s.eigenvalue for s in scores] == pytest.approx([s.eigenvalue for s in exact], rel=1e-12)

    subsampled, _ = score_with_operators(
        model, batches, hta.ScoringConfig(exact_max_features=4, max_tokens=16, exact_max_entries=0), loss_fn
    )
    assert all(isinstance(s.operator, TokenPairs) and s.tokens_used == 16 < s.tokens for s in subsampled)
