"""Run under `accelerate launch --multi_gpu --num_processes 2` on CPUs (gloo): scores, inserts and trains
with each rank holding half of the calibration batches, and writes what it saw to OUT/rank{r}.json for the
test to compare with a single-process run on all the batches."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import hf_bert  # noqa: E402

import hf_topoadapt as hta  # noqa: E402
from hf_topoadapt.sensitivity.distributed import PeerFailedError  # noqa: E402

NUM_BATCHES = 4


def all_batches():
    model, batches, *_ = hf_bert(seed=0)
    extra = hf_bert(seed=1)[1]
    return (batches + extra)[:NUM_BATCHES]


def main(out: Path, mode: str) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    batches = all_batches()[rank :: accelerator.num_processes]
    record: dict = {"rank": rank, "world": accelerator.num_processes}
    config = hta.ScoringConfig(solver=mode, max_tokens=10_000)

    model = hf_bert(seed=0)[0]
    scores = hta.score_positions(model, batches, config)
    record["eigenvalues"] = [s.eigenvalue for s in scores]
    record["tokens"] = [s.tokens for s in scores]

    # A failure on one rank reaches every rank instead of leaving the others waiting.
    def failing_loss(outputs, batch):
        if rank == 1:
            raise RuntimeError("loss failed on rank 1")
        return outputs.loss

    try:
        hta.score_positions(model, batches, config, loss_fn=failing_loss)
        record["failure"] = "none"
    except PeerFailedError:
        record["failure"] = "peer"
    except RuntimeError as error:
        record["failure"] = str(error)

    model = hf_bert(seed=0)[0]
    adapter_config = hta.TopoAdapterConfig(num_adapters=2, modules_to_save=["classifier"], solver=mode)
    adapted = hta.get_topo_model(model, adapter_config, batches)
    record["chosen"] = adapted.topo_report.chosen
    record["eps"] = [i["eps"] for i in adapted.topo_report.insertions if i["accepted"]]
    record["adapter_sum"] = float(sum(p.detach().double().sum() for n, p in adapted.named_parameters() if "topo_" in n))

    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    adapted.train()
    adapted, optimizer = accelerator.prepare(adapted, optimizer)
    losses = []
    for batch in batches:
        loss = adapted(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    record["train_losses"] = losses
    record["trained_sum"] = float(
        sum(p.detach().double().sum() for n, p in accelerator.unwrap_model(adapted).named_parameters() if "topo_" in n)
    )
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()  # a gloo group left to interpreter exit can abort the process


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
