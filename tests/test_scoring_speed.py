"""Scoring without host round trips and in full precision (issue 10): the solvers ignore autocast, scoring and
insertion under autocast agree with float32, positions solved in one batched run agree with positions solved
alone, the token budget is set in bytes, the screen's token sample does not bias the eigenvalue, the line
search's replayed passes equal full ones, and a Lanczos run asks the host a bounded number of questions.

Speed itself is measured by benchmarks/scoring.py and benchmarks/gpu_check.py, not here."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from models import hf_bert, hf_gpt2, hf_llama, hf_vit, residual_mlp
from torch.utils._python_dispatch import TorchDispatchMode

import hf_topoadapt as hta
from hf_topoadapt import insertion
from hf_topoadapt.scoring import score_with_operators
from hf_topoadapt.sensitivity import solvers
from hf_topoadapt.sensitivity.capture import PairAccumulator, token_cap
from hf_topoadapt.sensitivity.directions import coordinate_directions, optimized_directions
from hf_topoadapt.sensitivity.line_search import line_search
from hf_topoadapt.sensitivity.operators import DenseBlocks, TokenPairs, accumulate_blocks
from hf_topoadapt.sensitivity.precision import round_to_tf32
from hf_topoadapt.sensitivity.solvers import exact_spectrum, lanczos_spectra, lanczos_spectrum


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def planted_pairs(n=2000, d=48, seed=0, dtype=torch.float32, row=7, strength=0.5):
    """Random pairs with one planted direction in one block (a clear top eigenvalue)."""
    g = generator(seed)
    z = torch.randn(n, d + 1, generator=g, dtype=torch.float64)
    z[:, -1] = 1.0
    p = torch.randn(n, d, generator=g, dtype=torch.float64)
    direction = torch.randn(d + 1, generator=g, dtype=torch.float64)
    p[:, row] += strength * (z @ (direction / direction.norm())) ** 2
    return z.to(dtype), p.to(dtype)


# ---------------------------------------------------------------------------------------------------------
# full precision whatever the autocast state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_solvers_ignore_autocast(dtype):
    """Under a bfloat16 autocast the solvers compute exactly what they compute without it, in the input dtype."""
    z, p = planted_pairs(dtype=dtype)
    pairs = TokenPairs(z, p, 1.0, 2.0)

    def run():
        blocks = accumulate_blocks(z, p, 1.0)
        exact = exact_spectrum(DenseBlocks(blocks), 16)
        approx = lanczos_spectrum(pairs, 16, 8, 48, 8, generator=generator(0))
        coordinate = coordinate_directions(approx, pairs.num_outputs, 0.5, 4)
        optimized = optimized_directions(pairs, approx, 2, iterations=3)
        return blocks, exact, approx, coordinate, optimized

    expected = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[0].dtype == dtype
    for a, b in ((got[1], expected[1]), (got[2], expected[2])):
        assert a.eigenvalues.dtype == a.vectors.dtype == dtype
        assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.vectors, b.vectors)
    for a, b in ((got[3], expected[3]), (got[4], expected[4])):
        assert a.down.dtype == dtype
        assert torch.equal(a.down, b.down) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("builder", [hf_llama, hf_vit], ids=["hf_llama", "hf_vit"])
def test_scoring_and_insertion_under_autocast(builder):
    """The user's autocast runs the model's forward and backward in bfloat16; the numerics stay in float32, so the
    eigenvalues are those of float32 scoring up to the bfloat16 forward's error."""
    model, batches, loss_fn, _, _ = builder()
    model = model.float()
    config = hta.ScoringConfig(solver="lanczos")
    expected, _ = score_with_operators(model, batches, config, loss_fn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = score_with_operators(model, batches, config, loss_fn)
        record = hta.insert_layer(copy.deepcopy(model), batches, config, loss_fn)
    for a, b in zip(scores, expected, strict=True):
        assert a.operator.dtype == a.spectrum.eigenvalues.dtype == torch.float32
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=0.05), a.name
    assert record.accepted and record.loss_after < record.loss_before


def test_get_topo_model_under_autocast():
    model, batches, loss_fn, _, _ = hf_llama()
    model = model.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        adapted = hta.get_topo_model(model, hta.TopoAdapterConfig(num_adapters=2, line_search_steps=4), batches)
    # bf16 losses are coarse: a later layer whose decrease they cannot resolve is refused, with the reason
    insertions = adapted.topo_report.insertions
    assert adapted.topo_report.chosen and insertions[0]["accepted"]
    for record in insertions:
        if record["accepted"]:
            assert record["loss_after"] < record["loss_before"]
        else:
            assert record["reason"].startswith("no step of the line search lowered the calibration loss")


def test_tf32_eigenvalues_are_remeasured_in_full_precision():
    """With tf32 the Ritz pairs are re-measured with full products (Rayleigh quotients): on the CPU, where the
    products are float32 anyway, the same eigenpairs come out."""
    z, p = planted_pairs(dtype=torch.float32)
    pairs = TokenPairs(z, p, 1.0)
    plain = lanczos_spectrum(pairs, 16, 8, 48, 8, generator=generator(0))
    remeasured = lanczos_spectrum(pairs, 16, 8, 48, 8, generator=generator(0), tf32=True)
    torch.testing.assert_close(remeasured.eigenvalues, plain.eigenvalues, rtol=1e-5, atol=1e-6 * plain.top)
    assert torch.equal(remeasured.rows, plain.rows)
    for value, row, vector in zip(remeasured.eigenvalues[:4], remeasured.rows[:4], remeasured.vectors[:4], strict=True):
        rayleigh = vector @ pairs.apply(vector[None], row[None])[0] / (vector @ vector)
        assert float(rayleigh) == pytest.approx(float(value), rel=1e-5)


def test_round_to_tf32_keeps_ten_mantissa_bits():
    x = torch.tensor([1.0, 1 + 2**-11, 1 + 3 * 2**-12, -(1 + 3 * 2**-12), 1 + 2**-10, math.inf])
    assert round_to_tf32(x).tolist() == [1.0, 1 + 2**-10, 1 + 2**-10, -(1 + 2**-10), 1 + 2**-10, math.inf]
    values = torch.randn(1000, generator=generator(0))
    relative = ((round_to_tf32(values) - values) / values).abs().max()
    assert 0 < relative <= 2**-11


# ---------------------------------------------------------------------------------------------------------
# positions batched in one run


def test_batched_lanczos_equals_each_operator_alone():
    operators = [
        TokenPairs(*planted_pairs(n=300 + 200 * i, seed=i, dtype=torch.float64, row=3 * i), 1.0) for i in range(3)
    ]
    alone = [lanczos_spectrum(op, 16, 8, 48, 8, generator=generator(i)) for i, op in enumerate(operators)]
    together = lanczos_spectra(operators, 16, 8, 48, 8, generators=[generator(i) for i in range(3)])
    for a, b, op in zip(together, alone, operators, strict=True):
        torch.testing.assert_close(a.eigenvalues, b.eigenvalues, rtol=1e-10, atol=0)
        assert torch.equal(a.rows, b.rows)
        assert a.top == pytest.approx(exact_spectrum(op, 1).top, rel=1e-10)


@pytest.mark.parametrize("builder", [hf_gpt2, hf_bert], ids=["hf_gpt2", "hf_bert"])
def test_batch_positions_gives_the_same_scores(builder):
    model, batches, loss_fn, _, _ = builder(width=32) if builder is hf_gpt2 else builder()
    alone = hta.score_positions(model, batches, hta.ScoringConfig(solver="lanczos", batch_positions=False), loss_fn)
    together = hta.score_positions(model, batches, hta.ScoringConfig(solver="lanczos", batch_positions=True), loss_fn)
    exact = hta.score_positions(model, batches, hta.ScoringConfig(solver="exact"), loss_fn)
    for a, b, c in zip(together, alone, exact, strict=True):
        assert a.eigenvalue == pytest.approx(b.eigenvalue, rel=1e-9)
        assert a.eigenvalue == pytest.approx(c.eigenvalue, rel=1e-6)
        assert a.neurons == b.neurons


# ---------------------------------------------------------------------------------------------------------
# the token budget in bytes, and the screen's sample


def test_token_cap_by_bytes():
    assert token_cap(None, None, 100, 4) > 10**12  # every token
    assert token_cap(50, None, 100, 4) == 50
    assert token_cap(None, 408 * 10, 100, 4) == 10  # (q + d_out) floats and a float64 key per token
    assert token_cap(7, 408 * 10, 100, 4) == 7


def test_memory_budget_bounds_the_pairs_and_the_default_keeps_every_token():
    model, batches, loss_fn, width, _ = hf_gpt2(width=32)
    everything = hta.score_positions(model, batches, hta.ScoringConfig(solver="lanczos"), loss_fn)
    assert all(s.tokens_used == s.tokens - sum(b["input_ids"].shape[0] for b in batches) for s in everything)
    per_token = (2 * width + 1) * 8 + 8  # float64 z and p, a float64 key
    positions = len(everything)
    budget = 10 * per_token * positions  # 10 tokens per position
    capped, _ = score_with_operators(
        model, batches, hta.ScoringConfig(solver="lanczos", cpu_pair_memory=budget), loss_fn
    )
    for score in capped:
        assert score.tokens_used == 10 and score.operator.z.shape[0] == 10
        assert score.tokens == everything[0].tokens
    # the explicit cap still works, and a saved config that has it loads
    config = hta.TopoAdapterConfig(max_tokens=8192)
    assert hta.TopoAdapterConfig(**json.loads(json.dumps(config.to_dict()))).max_tokens == 8192
    assert hta.ScoringConfig().max_tokens is None


def test_screen_sample_ranks_blocks_but_the_eigenvalue_uses_every_token():
    """The screen on a token sample only picks which blocks to refine; the refined eigenvalue is that of every
    token (not the inflated one of the sample)."""
    z, p = planted_pairs(n=4000, d=40, dtype=torch.float64, strength=0.3)
    pairs = TokenPairs(z, p, 1.0)
    exact = exact_spectrum(pairs, 16)
    # 2 blocks refined: a shortlist of 8 is screened again on every token; a sample of 500 pays off here
    assert solvers._sample_pays(pairs, 500, solvers.SHORTLIST * 2)
    assert not solvers._sample_pays(pairs, 500, 40) and not solvers._sample_pays(pairs, 4000, 8)
    sampled = lanczos_spectrum(pairs, 16, 8, 48, 2, generator=generator(0), screen_tokens=500)
    assert sampled.top == pytest.approx(exact.top, rel=1e-8)
    assert int(sampled.rows[0]) == int(exact.rows[0])
    # a 500-token subsample alone gives a different (noisier) top eigenvalue
    small = pairs.token_subsample(500, generator(0))
    assert small.z.shape[0] == 500 and small.scale == pytest.approx(4000 / 500)
    assert abs(exact_spectrum(small, 1).top / exact.top - 1) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# host round trips


class HostReads(TorchDispatchMode):
    """Counts operations that make the host wait for an accelerator (reading a number, data-dependent shapes)."""

    SYNCING = {"_local_scalar_dense", "nonzero", "_unique2", "masked_select", "_linalg_eigh"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] in self.SYNCING
        return func(*args, **(kwargs or {}))


def test_lanczos_waits_for_the_host_only_every_few_steps():
    """No host read per step: draws happen on the device and breakdowns are repaired without asking which rows
    broke; the refinement checks convergence every 4 steps. The count does not grow with the steps."""
    z, p = planted_pairs(n=500, d=64, dtype=torch.float32, strength=0.05)
    pairs = TokenPairs(z, p, 1.0)
    counts = {}
    for iterations in (16, 48):
        with HostReads() as reads:
            spectrum = lanczos_spectrum(pairs, 16, iterations, iterations, 8, generator=generator(0))
        counts[iterations] = reads.count
        assert spectrum.residual < 1e-3
    # screen: one eigh; refinement: one eigh and one read per check (every 4 steps), and one final eigh
    assert counts[16] <= 2 + 2 * 16 // 4
    assert counts[48] <= 2 + 2 * 48 // 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_screen_and_refinement_through_exhausted_krylov_spaces(dtype):
    """Blocks of rank below the step counts (5 tokens, 8 screening and 48 refinement steps) and a dead output
    neuron (a zero block) break the Krylov recurrence in every row; the screen decouples them without a host
    read, the refinement restarts from fresh directions, and the eigenvalues stay exact."""
    g = generator(4)
    z = torch.cat([torch.randn(5, 20, generator=g), torch.ones(5, 1)], dim=1).to(dtype)
    p = torch.randn(5, 12, generator=g).to(dtype)
    p[:, 3] = 0.0
    pairs = TokenPairs(z, p, 1.0)
    exact = exact_spectrum(TokenPairs(z.double(), p.double(), 1.0), 8)
    approx = lanczos_spectrum(pairs, 8, 8, 48, 12, generator=generator(0))
    tolerance = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(
        approx.eigenvalues[:4].double(), exact.eigenvalues[:4], rtol=tolerance, atol=tolerance * exact.top
    )
    assert torch.isfinite(approx.vectors).all()


def test_token_pairs_are_kept_without_host_reads():
    z, p = planted_pairs(n=400, d=6, dtype=torch.float64, row=2)
    p[::3] = 0.0
    accumulator = PairAccumulator("pairs", 1.0, 100, 3, torch.float64, generator(0))
    with HostReads() as reads:
        for start in range(0, 400, 50):
            accumulator.add(z[start : start + 50, :-1], p[start : start + 50])
    assert reads.count == 0
    assert accumulator.tokens_used == 100 and accumulator.candidates == 400 - len(range(0, 400, 3))


# ---------------------------------------------------------------------------------------------------------
# line search: replayed passes and where it starts


@pytest.mark.parametrize(
    "builder, position",
    [(hf_bert, "bert.encoder.layer.1"), (hf_llama, "model.layers.0"), (residual_mlp, "head.1")],
    ids=["hf_bert", "hf_llama", "residual_mlp-head"],
)
def test_replayed_line_search_equals_full_passes(builder, position, monkeypatch):
    """The trials after the first skip the blocks before the layer (their outputs replayed) and give the losses
    of full forward passes."""
    model, batches, loss_fn, _, _ = builder()
    replayed = insertion.insert_layer(copy.deepcopy(model), batches, None, loss_fn, position)
    assert replayed.replayed
    monkeypatch.setattr(insertion, "prefix_modules", lambda *args: [])
    full = insertion.insert_layer(copy.deepcopy(model), batches, None, loss_fn, position)
    assert not full.replayed
    assert full.position == replayed.position
    assert [e for e, _ in full.line_search] == [e for e, _ in replayed.line_search]
    assert [loss for _, loss in replayed.line_search] == pytest.approx(
        [loss for _, loss in full.line_search], rel=1e-12
    )
    assert replayed.eps == full.eps


def test_line_search_walks_down_from_a_first_step_past_the_minimum():
    calls = []

    def loss_at(eps):
        calls.append(eps)
        return (abs(eps) - 1.0) ** 2 + (0.1 if eps < 0 else 0.0)

    result = line_search(loss_at, base_loss=1.0, start=0.125, growth=2.0, steps=8, patience=1, first=5)
    assert result.eps == 1.0 and result.step == 3 and result.loss == 0.0
    # + side: k = 5, 6 (higher: walk down), 4, 3, 2 (higher: stop); - side the same
    assert calls == [4.0, 8.0, 2.0, 1.0, 0.5, -4.0, -8.0, -2.0, -1.0, -0.5]
