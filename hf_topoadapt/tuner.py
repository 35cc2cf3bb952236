"""The PEFT tuner: topo adapters as peft `BaseTunerLayer`s, so `PeftModel` gives save/load, the Hub,
disable_adapter, several adapters and trainable-parameter accounting.

Unlike LoRA, a topo layer does not replace its target: it becomes a child of the block it follows
(`topo_adapter`, or `topo_adapter_input` for the stream entering the first block) and a hook applies it,
so module paths and every base checkpoint key stay unchanged.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import AuxiliaryTrainingWrapper
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn
from torch.nn import functional as F

from .activations import resolve_activation
from .layers import ADAPTER_ATTRIBUTE, TopoAdapter, find_adapter_hooks, register_adapter_hook

PREFIX = "topo_"


def sharded_parameters(model: nn.Module) -> bool:
    """Whether the model holds DTensor weights (FSDP2's fully_shard, tensor parallelism)."""
    if not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def check_not_sharded(model: nn.Module) -> None:
    """Topo adapters go into the unsharded model. Added to a model already sharded by FSDP (or holding DTensor
    weights), their weights would stay outside the shards: each process would train its own copy and the copies
    would drift apart without an error."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if sharded_parameters(model) or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise ValueError(
            "the model is already sharded (FSDP / DTensor weights): topo adapters must be added before sharding, or "
            "each process would train its own unsharded copy of them. Call get_topo_model (or TopoModel.from_pretrained"
            ") on the unsharded model, then shard it (fully_shard on each block and on the root, or accelerator."
            "prepare); score_positions itself works on a sharded model"
        )


class TopoLayer(nn.Module, BaseTunerLayer):
    """h + sum over active adapters of U sigma(D h + b), one (D, b, U) per adapter name."""

    adapter_layer_names = ("topo_down", "topo_up")
    other_param_names = ("topo_layout", "topo_activation", "topo_dropout_p")

    def __init__(self, width: int, layout: str, kernel_size: int = 3):
        super().__init__()
        self.width, self.layout, self.kernel_size = width, layout, kernel_size
        self.topo_down = nn.ModuleDict()
        self.topo_up = nn.ParameterDict()
        self.topo_activation = nn.ModuleDict()
        # probabilities, not nn.Dropout children: peft matches modules_to_save by name suffix, and a child named
        # `...topo_dropout` would be taken for a user's head named `out`
        self.topo_dropout_p: dict[str, float] = {}
        self.topo_layout = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = "default"
        self.frozen_peft_weight_names = {}

    def update_layer(
        self,
        adapter_name: str,
        num_neurons: int,
        activation: str,
        train_up: bool,
        dtype=None,
        device=None,
        dropout: float = 0.0,
    ) -> None:
        factory = {"dtype": dtype, "device": device}
        if self.layout == "channels":
            down = nn.Conv2d(self.width, num_neurons, self.kernel_size, padding=self.kernel_size // 2, **factory)
        else:
            down = nn.Linear(self.width, num_neurons, **factory)
        nn.init.zeros_(down.weight)
        nn.init.zeros_(down.bias)
        self.topo_down[adapter_name] = down
        self.topo_up[adapter_name] = nn.Parameter(torch.zeros(self.width, num_neurons, **factory))
        self.topo_activation[adapter_name], _ = resolve_activation(activation)
        self.topo_dropout_p[adapter_name] = float(dropout)
        if not train_up:
            self.frozen_peft_weight_names = {**self.frozen_peft_weight_names, adapter_name: ("topo_up",)}
        self.set_adapter(self.active_adapters)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Each adapter computes in its weights' dtype (peft keeps them in float32 on a bf16/fp16 model) and the
        sum is returned in the stream's dtype, as peft's LoRA layers do."""
        if self.disable_adapters:
            return h
        out = h
        for name in self.active_adapters:
            if name not in self.topo_down:
                continue
            down, up = self.topo_down[name], self.topo_up[name]
            x = self._cast_input_dtype(h, down.weight.dtype)
            p = self.topo_dropout_p.get(name, 0.0)
            hidden = self.topo_activation[name](down(F.dropout(x, p, self.training) if p else x))
            if self.layout == "channels":
                out = out + F.conv2d(hidden, up[:, :, None, None].to(hidden.dtype))
            else:
                out = out + F.linear(hidden, up.to(hidden.dtype))
        return out.to(h.dtype)

    def to_plain(self, adapter_name: str) -> TopoAdapter:
        """The adapter as a plain `TopoAdapter` (for merge_and_unload)."""
        down, up = self.topo_down[adapter_name], self.topo_up[adapter_name]
        plain = TopoAdapter(
            self.width,
            up.shape[1],
            self.layout,
            self.kernel_size,
            self.topo_activation[adapter_name],
            dropout=self.topo_dropout_p.get(adapter_name, 0.0),
            dtype=up.dtype,
            device=up.device,
        )
        plain.load_state_dict({"down.weight": down.weight, "down.bias": down.bias, "up": up})
        return plain


class TopoTuner(BaseTuner):
    prefix = PREFIX
    tuner_layer_cls = TopoLayer
    target_module_mapping: dict = {}

    def _pre_injection_hook(self, model: nn.Module, config, adapter_name: str) -> None:
        check_not_sharded(model)

    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.adapter_shapes is None:
            raise ValueError(
                "this TopoAdapterConfig has no adapter_shapes: create the model with hf_topoadapt.get_topo_model("
                "model, config, calibration_data=...) (which scores and fills them), start a model that grows from "
                "its head with hf_topoadapt.growth.head_only_topo_model, or load a saved adapter"
            )
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """An adapter with no layers yet (adapter_shapes == {}: progressive growth starting from the head, whose
        layers are added later) matches no module, which peft refuses except for its dummy target; peft then still
        freezes the base model and sets up modules_to_save."""
        config = self.peft_config[adapter_name]
        if config.adapter_shapes != {}:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        target_modules, config.target_modules = config.target_modules, DUMMY_TARGET_MODULES
        try:
            return super().inject_adapter(model, adapter_name, *args, **kwargs)
        finally:
            config.target_modules = target_modules

    def _check_target_module_exists(self, peft_config, key: str) -> bool:
        return any(shape["module"] == key for shape in peft_config.adapter_shapes.values())

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        # a target without parameters (an activation inside a head) takes the model's dtype and device
        parameter = next(target.parameters(), None)
        if parameter is None:
            parameter = next(self.model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else None
        device = parameter.device if parameter is not None else None
        for shape in peft_config.adapter_shapes.values():
            if shape["module"] != current_key:
                continue
            attribute = ADAPTER_ATTRIBUTE[shape["where"]]
            layer = getattr(target, attribute, None)
            if layer is None:
                # adapters saved before the kernel was recorded per layer all have the config's
                layer = TopoLayer(shape["width"], shape["layout"], shape.get("kernel_size", peft_config.kernel_size))
                target.add_module(attribute, layer)
                register_adapter_hook(target, attribute, shape["where"])
            elif not isinstance(layer, TopoLayer):
                raise ValueError(f"{current_key}.{attribute} exists and is not a topo layer")
            layer.update_layer(
                adapter_name,
                shape["neurons"],
                peft_config.activation,
                peft_config.train_up,
                dtype,
                device,
                dropout=getattr(peft_config, "topo_dropout", 0.0),
            )

    def _topo_layers(self):
        for name, module in list(self.model.named_modules()):
            for attribute in ADAPTER_ATTRIBUTE.values():
                layer = getattr(module, attribute, None)
                if isinstance(layer, TopoLayer):
                    yield name, module, attribute, layer

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        """merge: every topo layer becomes a plain `TopoAdapter` child (the new layers stay, built in; a nonlinear
        layer cannot be folded into existing weights). unload: the layers and their hooks are removed. Either way
        peft's own pass then unwraps `modules_to_save`, so no peft class is left in the returned model."""
        for _, module, attribute, layer in list(self._topo_layers()):
            names = [n for n in (adapter_names or layer.active_adapters) if n in layer.topo_down]
            if merge and len(names) > 1:
                raise ValueError(f"merging {len(names)} topo adapters at one position is not supported; pick one")
            if merge and names and not layer.disable_adapters:
                module.add_module(attribute, layer.to_plain(names[0]))
                continue
            for key in find_adapter_hooks(module, attribute):
                module._forward_hooks.pop(key, None)
                module._forward_pre_hooks.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
            delattr(module, attribute)
        return super()._unload_and_optionally_merge(merge, progressbar, safe_merge, adapter_names)

    def _check_merge_allowed(self):
        return None

    def delete_adapter(self, adapter_name: str) -> None:
        """peft's version skips every module whose path holds the prefix "topo_" (so every topo layer: it is a child
        named topo_adapter...) and takes the next active adapter from the first layer it meets, which may hold none.
        Here the layers are walked, and a deleted active adapter hands over to the first adapter left."""
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name} does not exist; adapters: {list(self.peft_config)}")
        was_active = adapter_name in self.active_adapters
        del self.peft_config[adapter_name]
        for *_, layer in list(self._topo_layers()):
            for attribute in layer.adapter_layer_names + layer.other_param_names:
                if adapter_name in getattr(layer, attribute):
                    del getattr(layer, attribute)[adapter_name]
            layer.frozen_peft_weight_names.pop(adapter_name, None)
        active = [name for name in self.active_adapters if name != adapter_name]
        if was_active and not active:
            active = list(self.peft_config)[:1]
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):  # modules_to_save copies
                module.delete_adapter(adapter_name, new_active_adapters=active or None)
        if active:
            self.set_adapter(active, inference_mode=all(self.peft_config[name].inference_mode for name in active))
        else:
            self.active_adapter = []

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft upcasts bf16/fp16 adapter weights to float32 by replacing each `ParameterDict` entry with a new
        Parameter, which always requires grad: U (`topo_up`) would start training (train_up=False) and a model
        loaded for inference would have trainable adapters. Whether each one requires grad is put back."""
        ups = [layer.topo_up for *_, layer in self._topo_layers() if adapter_name in layer.topo_up]
        requires_grad = [up[adapter_name].requires_grad for up in ups]
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for up, flag in zip(ups, requires_grad, strict=True):
            up[adapter_name].requires_grad_(flag)
