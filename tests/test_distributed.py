"""Scoring and insertion under Accelerate with 2 CPU processes (gloo) equal the single-process result on
the same batches, every rank inserts the same layers, training runs, and a failure on one rank reaches
the other instead of leaving it waiting."""

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, mode: str) -> list[dict]:
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
        str(SCRIPT),
        str(out),
        mode,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


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
