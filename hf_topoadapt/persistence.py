"""Loading saved topo adapters, safetensors only, with clear errors for files that do not fit."""

from __future__ import annotations

import json
import os
import warnings

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .config import TOPO_PEFT_TYPE, TopoAdapterConfig
from .layers import ADAPTER_ATTRIBUTE, find_adapter_hooks
from .report import TopoReport
from .tuner import TopoLayer, check_not_sharded

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
HUB_KWARGS = ("subfolder", "revision", "token")  # what locates the files (hf_hub_download's arguments)


def check_saved_adapter(model_id: str, subfolder: str | None = None) -> None:
    """A local folder must hold the config and the safetensors weights (no pickle files are read)."""
    if not os.path.isdir(model_id):
        return  # a Hub id: peft downloads the same two files through huggingface_hub
    folder = os.path.join(model_id, subfolder) if subfolder else model_id
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a saved topo adapter: missing {missing}. Save one with TopoModel.save_pretrained(path) "
            "(only safetensors weights are loaded; an adapter not named 'default' is saved in a subfolder of its name)"
        )
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        peft_type = json.load(f).get("peft_type")
    if peft_type != TOPO_PEFT_TYPE:
        raise ValueError(f"{folder} holds a {peft_type!r} adapter, not a topo adapter (peft_type 'TOPO')")


def load_config(model_id: str, **kwargs) -> TopoAdapterConfig:
    """The saved config. TopoAdapterConfig's own check_kwargs refuses unknown settings, which
    PeftConfig.from_pretrained would drop."""
    config = TopoAdapterConfig.from_pretrained(model_id, **{k: v for k, v in kwargs.items() if k in HUB_KWARGS})
    if not isinstance(config, TopoAdapterConfig):
        raise ValueError(f"{model_id} does not hold a topo adapter config")
    return config


def check_adapter_to_add(model: nn.Module, model_id: str, **kwargs) -> None:
    """Before a new adapter is added: a safetensors topo adapter that fits the unsharded base model."""
    check_not_sharded(model)
    check_saved_adapter(model_id, kwargs.get("subfolder"))
    check_fits(model, load_config(model_id, **kwargs))


def check_loaded_keys(result) -> None:
    missing = [k for k in result.missing_keys if "topo_" in k]
    if missing:
        raise ValueError(f"the saved weights miss adapter tensors {missing[:5]}: the file does not match its config")


def read_report(
    model_id: str, subfolder: str | None = None, revision: str | None = None, token: str | None = None, **_
) -> TopoReport | None:
    """The adapter's topo_report.json from a local folder or the Hub; None when the adapter has none."""
    from .model import REPORT_NAME

    if os.path.isdir(model_id):
        path = os.path.join(model_id, subfolder or "", REPORT_NAME)
        if not os.path.isfile(path):
            return None
    else:
        try:
            path = hf_hub_download(model_id, REPORT_NAME, subfolder=subfolder, revision=revision, token=token)
        except LocalEntryNotFoundError:  # offline, and the weights came from the cache without it
            warnings.warn(
                f"{model_id}: {REPORT_NAME} is not in the local cache; loaded without its report", stacklevel=3
            )
            return None
        except EntryNotFoundError:
            return None
    with open(path) as f:
        return TopoReport.from_dict(json.load(f))


def check_fits(model: nn.Module, config: TopoAdapterConfig) -> None:
    """Every adapter's module must exist in the base model, with a matching hidden size where it can be told:
    the model config's hidden_size, else one of the sizes of the module's parameters (a block's norm or output
    projection has the width of its stream). A module without parameters (an activation in a head) is not checked.
    """
    problems = []
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    for position, shape in (config.adapter_shapes or {}).items():
        try:
            module = model.get_submodule(shape["module"])
        except AttributeError:
            problems.append(f"{position}: module {shape['module']!r} does not exist")
            continue
        sizes = {size for p in module.parameters() for size in p.shape[:2]}
        if shape["layout"] == "tokens" and hidden is not None:
            if hidden != shape["width"]:
                problems.append(f"{position}: adapter width {shape['width']} but the model's hidden size is {hidden}")
        elif sizes and shape["width"] not in sizes:
            problems.append(
                f"{position}: adapter width {shape['width']} but module {shape['module']!r} has parameters of sizes "
                f"{sorted(sizes)} only"
            )
    if problems:
        raise ValueError(
            "the saved topo adapter does not fit this base model: "
            + "; ".join(problems)
            + f". It was made for {config.base_model_name_or_path or 'another model'}"
        )


def load_topo_model(
    cls, model: nn.Module, model_id: str, adapter_name: str = "default", is_trainable: bool = False, **kwargs
):
    check_saved_adapter(model_id, kwargs.get("subfolder"))
    config = load_config(model_id, **kwargs)
    check_fits(model, config)
    config.inference_mode = not is_trainable
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        peft_model = cls(model, config, adapter_name)
        peft_model.load_adapter(model_id, adapter_name, is_trainable=is_trainable, **kwargs)  # weights and report
    except Exception:
        restore_base_model(model, requires_grad)
        raise
    return peft_model


def restore_base_model(model: nn.Module, requires_grad: dict[str, bool]) -> None:
    """Undoes a failed load: removes the topo layers and their hooks, puts back the modules wrapped for
    modules_to_save, drops peft's config attribute and restores which parameters required grad."""
    for name, module in list(model.named_modules()):
        for attribute in ADAPTER_ATTRIBUTE.values():
            if isinstance(getattr(module, attribute, None), TopoLayer):
                for key in find_adapter_hooks(module, attribute):
                    module._forward_hooks.pop(key, None)
                    module._forward_pre_hooks.pop(key, None)
                    module._forward_pre_hooks_with_kwargs.pop(key, None)
                delattr(module, attribute)
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, child_name = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, module.original_module)
    if "peft_config" in model.__dict__:
        del model.peft_config
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(requires_grad.get(name, parameter.requires_grad))
