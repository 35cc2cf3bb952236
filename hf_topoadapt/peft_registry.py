"""Makes peft know the "TOPO" adapter type, so peft.PeftModel.from_pretrained and PeftConfig.from_pretrained
load a saved topo adapter once hf_topoadapt is imported.

peft's register_peft_method only accepts members of its PeftType enum, which an out-of-tree package cannot
extend; its mapping tables are plain dicts, looked up by the config's peft_type string, so the entries
are added there directly.
"""

from __future__ import annotations

from peft import mapping

from .config import TOPO_PEFT_TYPE, TopoAdapterConfig
from .tuner import PREFIX, TopoTuner


def register() -> None:
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[TOPO_PEFT_TYPE] = TopoAdapterConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[TOPO_PEFT_TYPE] = TopoTuner
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[TOPO_PEFT_TYPE] = PREFIX
