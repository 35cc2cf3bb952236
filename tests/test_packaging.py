"""The wheel: every package of hf_topoadapt and the model-card template of the top-level model_cards/ folder (shipped
as hf_topoadapt.card_templates), and none of the recipes' own cards."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_holds_every_package_and_the_card_template(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            str(ROOT),
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("hf_topoadapt-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "hf_topoadapt").rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in packages} <= names
    templates = {f"hf_topoadapt/card_templates/{p.name}" for p in (ROOT / "model_cards").glob("*template*.md")}
    assert templates and templates <= names
    recipe_cards = [p.name for p in (ROOT / "model_cards").glob("*.md") if "template" not in p.name]
    assert not [name for name in names if any(name.endswith("/" + card) for card in recipe_cards)]


def test_the_installed_package_finds_its_template():
    from hf_topoadapt.cards import template_text

    assert template_text().startswith("---\n{{ card_data }}\n---")
