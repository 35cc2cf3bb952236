"""Run under `torchrun --nproc_per_node 2` on CPUs (gloo), with the base model sharded by FSDP2 (`fully_shard` on
every block and on the root). Each rank holds half of the batches. It scores the sharded model, then adapts an
unsharded copy (adapters inserted before sharding), shards it and trains, and writes what it saw to OUT/rank{r}.json.
`reference()` is the same work in one process on all the batches, for the test to compare with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import hf_bert  # noqa: E402

import hf_topoadapt as hta  # noqa: E402

NUM_BATCHES = 4
STEPS = 3
SCORING = {"solver": "exact"}


def all_batches() -> list[dict]:
    return (hf_bert(seed=0)[1] + hf_bert(seed=1)[1])[:NUM_BATCHES]


def base_model():
    """hf_bert in float32 without dropout, so that training is deterministic and comparable across runs."""
    model = hf_bert(seed=0)[0].float()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def adapter_config() -> hta.TopoAdapterConfig:
    # The paper's eigenvector layer: optimised directions come from an ascent whose stopping step moves with the
    # float32 summation order of the operators, which differs between 2 sharded processes and one.
    return hta.TopoAdapterConfig(
        num_adapters=2, line_search_steps=4, modules_to_save=["classifier"], directions="coordinate", **SCORING
    )


def merged(batches: list[dict]) -> dict:
    """The batches concatenated into one (equal batch sizes, so its mean loss is the mean of theirs)."""
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def train(model, steps_batches: list[dict]) -> list[float]:
    # small enough that the adapter at the classifier input and the head together do not overshoot
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    losses = []
    for batch in steps_batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def trainable_state(model) -> dict[str, list]:
    """Every trainable tensor in full (a sharded DTensor is gathered), by name without FSDP's or peft's wrapping."""
    out = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            tensor = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            out[name] = tensor.detach().double().flatten().tolist()
    return out


def reference() -> dict:
    """One process, all batches: the scores and the training the two sharded ranks together must reproduce."""
    batches = all_batches()
    scores = hta.score_positions(base_model(), batches, hta.ScoringConfig(**SCORING))
    adapted = hta.get_topo_model(base_model(), adapter_config(), batches)
    steps = [
        merged([batches[(2 * step) % NUM_BATCHES], batches[(2 * step + 1) % NUM_BATCHES]]) for step in range(STEPS)
    ]
    losses = train(adapted, steps)
    return {
        "eigenvalues": [s.eigenvalue for s in scores],
        "chosen": adapted.topo_report.chosen,
        "losses": losses,
        "trained": trainable_state(adapted),
    }


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for block in model.bert.encoder.layer:
        fully_shard(block)
    fully_shard(model)


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batches = all_batches()[rank::world]
    record: dict = {"rank": rank, "world": world}

    sharded = base_model()
    shard(sharded)
    record["local_numel"] = sum(p.to_local().numel() for p in sharded.parameters())
    scores = hta.score_positions(sharded, batches, hta.ScoringConfig(**SCORING))
    record["eigenvalues"] = [s.eigenvalue for s in scores]
    try:  # adapters added after sharding would stay unsharded and drift apart: refused
        hta.get_topo_model(sharded, adapter_config(), batches)
        record["adapt_sharded"] = "accepted"
    except ValueError as error:
        record["adapt_sharded"] = str(error)

    adapted = hta.get_topo_model(base_model(), adapter_config(), batches)  # inserted before sharding
    record["chosen"] = adapted.topo_report.chosen
    shard(adapted.get_base_model())
    record["types"] = sorted({type(p).__name__ for p in adapted.parameters()})
    mine = [batches[step % len(batches)] for step in range(STEPS)]  # step s: batch 2s + r of all four
    record["losses"] = train(adapted, mine)
    record["trained"] = trainable_state(adapted)
    adapted.save_pretrained(str(out / "saved"))  # every rank calls it; the adapter is gathered, rank 0 writes
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
