"""A TopoModel whose base is sharded by FSDP2 (`fully_shard` on every block and on the root), 2 CPU processes
over gloo under plain `torchrun`: scoring the sharded model gives one process's scores; adapters inserted before
sharding are sharded with their blocks, train to what one process computes on the whole batches, and save (gathered)
to a folder that loads onto an unsharded base; adapting an already sharded model is refused with a clear error.

Plain torchrun, not Accelerate: Accelerate 1.15 runs FSDP only on accelerators. On the CPU its FSDP plugin is
ignored: `Accelerator(cpu=True, fsdp_plugin=...)` wraps the model in DDP (DistributedType.MULTI_CPU) without a word,
and `accelerate launch --use_fsdp` without `cpu` starts processes that each run alone (DistributedType.NO)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import hf_topoadapt as hta

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import fsdp_run  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_run.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(SCRIPT), str(out),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def single() -> dict:
    return fsdp_run.reference()


def test_the_base_is_really_sharded(run):
    _, ranks = run
    whole = sum(p.numel() for p in fsdp_run.base_model().parameters())
    assert [r["world"] for r in ranks] == [2, 2]
    assert sum(r["local_numel"] for r in ranks) == whole and all(r["local_numel"] < whole for r in ranks)
    assert ranks[0]["types"] == ranks[1]["types"] == ["DTensor"]  # the adapters were sharded with their blocks


def test_scoring_a_sharded_model_gives_one_process_scores(run, single):
    _, ranks = run
    for record in ranks:
        assert record["eigenvalues"] == pytest.approx(single["eigenvalues"], rel=1e-5)
        assert record["chosen"] == single["chosen"]


def test_sharded_training_matches_one_process(run, single):
    _, ranks = run
    assert ranks[0]["trained"].keys() == ranks[1]["trained"].keys() == single["trained"].keys()
    assert any(".topo_down." in name for name in single["trained"])
    for name, values in single["trained"].items():
        assert ranks[0]["trained"][name] == ranks[1]["trained"][name], name  # one model, gathered from its shards
        assert ranks[0]["trained"][name] == pytest.approx(values, rel=1e-4, abs=1e-5), name
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"], strict=True)]
    assert mean_losses == pytest.approx(single["losses"], rel=1e-5)
    assert single["losses"][-1] < single["losses"][0]


def test_the_sharded_model_saves_an_adapter_that_loads_unsharded(run, single):
    out, ranks = run
    loaded = hta.TopoModel.from_pretrained(fsdp_run.base_model(), str(out / "saved"), is_trainable=True)
    assert loaded.topo_report.chosen == single["chosen"]
    saved = fsdp_run.trainable_state(loaded)
    assert saved.keys() == ranks[0]["trained"].keys()
    for name, values in saved.items():
        assert values == ranks[0]["trained"][name], name


def test_adapting_an_already_sharded_model_is_refused(run):
    _, ranks = run
    for record in ranks:
        message = record["adapt_sharded"]
        assert message.startswith("the model is already sharded (FSDP / DTensor weights)")
        assert "before sharding" in message and "fully_shard" in message
