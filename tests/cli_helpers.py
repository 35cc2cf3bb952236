"""Helpers shared by the command-line tests: reading the ranked table, checking one-line errors, and the mean
calibration loss of a model (what the topo report records before and after each insertion)."""

from __future__ import annotations

import json

import torch

from hf_topoadapt.sensitivity.objective import mean_loss


def table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["rank", "position"]) + 2
    rows = []
    for line in lines[start:]:
        if not line.strip() or not line.split()[0].isdigit():
            break
        rows.append(line.split())
    return rows


def one_line_error(capsys, code: int, *needles: str) -> str:
    out = capsys.readouterr()
    assert code == 2
    lines = [line for line in out.err.splitlines() if line.strip()]
    assert len(lines) == 1, out.err
    assert lines[0].startswith("hf-topoadapt: error: ")
    assert "Traceback" not in out.err
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def report_losses(adapter_dir) -> tuple[float, float]:
    """The calibration loss before the first insertion and after the last accepted one, from topo_report.json."""
    report = json.loads((adapter_dir / "topo_report.json").read_text())
    accepted = [insertion for insertion in report["insertions"] if insertion["accepted"]]
    return accepted[0]["loss_before"], accepted[-1]["loss_after"]


@torch.no_grad()
def calibration_loss(model, batches) -> float:
    return mean_loss(model.eval(), batches, None)
