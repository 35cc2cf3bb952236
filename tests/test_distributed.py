"""Scoring and insertion under Accelerate with 2 CPU processes (gloo) equal the single-process result on
the same batches, every rank inserts the same layers, training runs, a failure on one rank reaches
the other instead of leaving it waiting, and growth inside a DDP wrapper keeps the ranks identical."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import hf_topoadapt as hta

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from distributed_run import all_batches  # noqa: E402
from models import hf_bert  # noqa: E402

SCRIPT = Path(__file__).parent / "scripts" / "distributed_run.py"
GROWTH_SCRIPT = Path(__file__).parent / "scripts" / "distributed_growth.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, *args: str, script: Path = SCRIPT, outputs: str = "rank") -> list[dict]:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # `accelerate launch --cpu` starts one process unless mpirun is set up; --multi_gpu goes through
    # torch.distributed.run, and the script's Accelerator(cpu=True) then runs 2 CPU processes over gloo.
    command = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--main_process_port",
        str(free_port()),
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(script),
        str(out),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"{outputs}{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("mode", ["exact", "lanczos"])
def test_two_processes_match_one(tmp_path, mode):
    ranks = launch(tmp_path, mode)
    config = hta.ScoringConfig(solver=mode, max_tokens=10_000)
    single = hta.score_positions(hf_bert(seed=0)[0], all_batches(), config)
    for record in ranks:
        assert record["world"] == 2
        assert record["eigenvalues"] == pytest.approx([s.eigenvalue for s in single], rel=1e-9)
        assert record["tokens"] == [s.tokens for s in single]

    # The same layers at the same places on both ranks, as a single process would insert them.
    adapted = hta.get_topo_model(
        hf_bert(seed=0)[0],
        hta.TopoAdapterConfig(num_adapters=2, modules_to_save=["classifier"], solver=mode),
        all_batches(),
    )
    assert ranks[0]["chosen"] == ranks[1]["chosen"] == adapted.topo_report.chosen
    expected_eps = [i["eps"] for i in adapted.topo_report.insertions if i["accepted"]]
    assert ranks[0]["eps"] == ranks[1]["eps"] == pytest.approx(expected_eps, rel=1e-9)
    assert ranks[0]["adapter_sum"] == pytest.approx(ranks[1]["adapter_sum"], rel=1e-12)

    # Training under DDP ran and kept the ranks' adapters identical.
    for record in ranks:
        assert len(record["train_losses"]) == 2 and all(abs(x) < 1e6 for x in record["train_losses"])
    assert ranks[0]["trained_sum"] == pytest.approx(ranks[1]["trained_sum"], rel=1e-12)
    assert ranks[0]["trained_sum"] != pytest.approx(ranks[0]["adapter_sum"], rel=1e-9)

    # Rank 1's loss raised: rank 1 sees its own error, rank 0 is told a peer failed (and does not hang).
    assert ranks[1]["failure"] == "loss failed on rank 1"
    assert ranks[0]["failure"] == "peer"


def test_growth_under_ddp_keeps_ranks_identical_and_matches_one_process(tmp_path):
    ranks = launch(tmp_path, script=GROWTH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(GROWTH_SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    single = json.loads((tmp_path / "single.json").read_text())
    assert [r["wrapped"] for r in ranks] == ["DistributedDataParallel"] * 2
    # The same insertions on both ranks, and the ones one process makes on the whole batches.
    assert ranks[0]["positions"] == ranks[1]["positions"] == single["positions"]
    assert len(single["positions"]) == 2 and ranks[0]["depth"] == single["depth"] == 3
    assert ranks[0]["eps"] == pytest.approx(single["eps"], rel=1e-9)
    assert ranks[1]["eps"] == pytest.approx(single["eps"], rel=1e-9)
    # Every parameter, the grown layers' included, identical across ranks (their gradients were averaged) and
    # equal to one process's (DDP's mean of half-batch gradients is the whole-batch gradient).
    assert ranks[0]["parameters"].keys() == single["parameters"].keys()
    for name, values in single["parameters"].items():
        assert ranks[0]["parameters"][name] == pytest.approx(ranks[1]["parameters"][name], abs=1e-12), name
        assert ranks[0]["parameters"][name] == pytest.approx(values, rel=1e-7, abs=1e-9), name
    mean_losses = [(a + b) / 2 for a, b in zip(ranks[0]["train_losses"], ranks[1]["train_losses"], strict=True)]
    assert mean_losses == pytest.approx(single["train_losses"], rel=1e-7)


def test_growth_callback_inside_trainer_under_ddp_keeps_ranks_identical(tmp_path):
    ranks = launch(tmp_path, "trainer", script=GROWTH_SCRIPT, outputs="trainer")
    assert [r["world"] for r in ranks] == [2, 2]
    assert [r["wrapped"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert ranks[0]["positions"] == ranks[1]["positions"] and len(ranks[0]["positions"]) == 2
    assert ranks[0]["depth"] == ranks[1]["depth"] == 3
    for name, values in ranks[0]["parameters"].items():
        assert values == pytest.approx(ranks[1]["parameters"][name], abs=1e-6), name
