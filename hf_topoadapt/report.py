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
    warmup: dict | None = None  # the head warm-up before scoring: steps, lr, loss before and after
    # Where the setup's wall time went (warmup, capture, eigen_solves, directions, line_search, in seconds) on the
    # machine that built the adapter: not saved with it (the saved report stays the same wherever it is built).
    seconds: dict[str, float] = field(default_factory=dict, compare=False)

    @classmethod
    def from_records(cls, records) -> TopoReport:
        scores = [s.as_dict() for s in records[0].scores] if records else []
        insertions = [{key: getattr(r, key) for key in INSERTION_KEYS} for r in records]
        seconds: dict[str, float] = {}
        for record in records:
            for phase, value in record.seconds.items():
                seconds[phase] = seconds.get(phase, 0.0) + value
        return cls(scores, insertions, seconds=seconds)

    @classmethod
    def from_dict(cls, data: dict) -> TopoReport:
        return cls(list(data.get("scores", [])), list(data.get("insertions", [])), data.get("warmup"))

    def as_dict(self) -> dict:
        out = {"scores": self.scores, "insertions": self.insertions}
        return {**out, "warmup": self.warmup} if self.warmup else out

    @property
    def chosen(self) -> list[str]:
        return [i["position"] for i in self.insertions if i["accepted"]]

    def warmup_line(self) -> str:
        if not self.warmup:
            return ""
        w = self.warmup
        return (
            f"Head warm-up before scoring: {', '.join(w['modules'])} alone, {w['steps']} steps at lr {w['lr']:g}, "
            f"calibration loss {w['loss_before']:.4f} -> {w['loss_after']:.4f}."
        )

    def seconds_line(self) -> str:
        if not self.seconds:
            return ""
        parts = ", ".join(f"{phase.replace('_', ' ')} {value:.2f} s" for phase, value in self.seconds.items())
        return f"Setup {sum(self.seconds.values()):.2f} s: {parts}."

    def scores_table(self) -> str:
        chosen = set(self.chosen)
        crossed = any(s.get("crossfit_eigenvalue") is not None for s in self.scores)
        if crossed:  # both estimates: the plain top eigenvalue and the cross-fitted value positions compete by
            lines = ["| depth | position | eigenvalue | cross-fitted | chosen |", "|---:|---|---:|---:|:---:|"]
        else:
            lines = ["| depth | position | eigenvalue | chosen |", "|---:|---|---:|:---:|"]
        for s in sorted(self.scores, key=lambda s: s["index"]):
            fitted = s.get("crossfit_eigenvalue")
            cell = f" {fitted:.4g} |" if crossed and fitted is not None else (" - |" if crossed else "")
            lines.append(
                f"| {s['index']} | {s['name']} | {s['eigenvalue']:.4g} |{cell} {'yes' if s['name'] in chosen else ''} |"
            )
        return "\n".join(lines)

    def insertions_table(self) -> str:
        lines = [
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

    def table(self) -> str:
        """The warm-up (if any), every position's score, what was inserted and where the setup's time went, as
        markdown."""
        parts = (self.warmup_line(), self.scores_table(), self.insertions_table(), self.seconds_line())
        return "\n\n".join(part for part in parts if part)

    def __str__(self) -> str:
        return self.table()
