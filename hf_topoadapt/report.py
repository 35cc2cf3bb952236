"""The topo report: every position's score, and what was inserted where (neurons, eps, predicted and
measured calibration-loss decrease). Printed as a table and saved with the adapter."""

from __future__ import annotations

from dataclasses import dataclass, field

INSERTION_KEYS = (
    "position",
    "index",
    "eigenvalue",
    "accepted",
    "reason",
    "directions",
    "num_neurons",
    "rows",
    "gain",
    "eps",
    "loss_before",
    "loss_after",
    "predicted_decrease",
    "measured_decrease",
)


@dataclass
class TopoReport:
    scores: list[dict] = field(default_factory=list)  # every candidate position, from the first scoring round
    insertions: list[dict] = field(default_factory=list)

    @classmethod
    def from_records(cls, records) -> TopoReport:
        scores = [s.as_dict() for s in records[0].scores] if records else []
        insertions = [{key: getattr(r, key) for key in INSERTION_KEYS} for r in records]
        return cls(scores, insertions)

    @classmethod
    def from_dict(cls, data: dict) -> TopoReport:
        return cls(list(data.get("scores", [])), list(data.get("insertions", [])))

    def as_dict(self) -> dict:
        return {"scores": self.scores, "insertions": self.insertions}

    @property
    def chosen(self) -> list[str]:
        return [i["position"] for i in self.insertions if i["accepted"]]

    def table(self) -> str:
        chosen = set(self.chosen)
        lines = ["| depth | position | eigenvalue | chosen |", "|---:|---|---:|:---:|"]
        for s in sorted(self.scores, key=lambda s: s["index"]):
            lines.append(
                f"| {s['index']} | {s['name']} | {s['eigenvalue']:.4g} | {'yes' if s['name'] in chosen else ''} |"
            )
        lines += [
            "",
            "| position | neurons | eps | predicted decrease | measured decrease | loss before -> after |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for i in self.insertions:
            if not i["accepted"]:
                lines.append(f"| {i['position']} | not inserted: {i['reason']} | | | | |")
                continue
            lines.append(
                f"| {i['position']} | {i['num_neurons']} | {i['eps']:.4g} | {i['predicted_decrease']:.4g} | "
                f"{i['measured_decrease']:.4g} | {i['loss_before']:.4f} -> {i['loss_after']:.4f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
