"""Growth inside `transformers.Trainer`: a callback around `Grower` (a plain model) or `TopoModelGrower` (a
TopoModel, whose new layers join its peft adapter)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..sensitivity.objective import LossFn
from .distributed import unwrap
from .grow import Grower, GrowthConfig, first_batches
from .state import rebuild, save_json
from .topo_model import make_grower

GROWTH_STATE_NAME = "topo_growth.json"


class TopoGrowthCallback(TrainerCallback):
    """Grows the Trainer's model between epochs (METHOD.md section 7): a plain model, or a TopoModel (detected),
    whose new layers become part of its peft adapter, so the Trainer's checkpoints and save_pretrained hold them.

    Decides at each epoch end, or at each evaluation when the config needs validation losses (patience or
    stop_patience; set eval_strategy="epoch"). Scores on `calibration_data` (default: the first
    `calibration_batches` batches of the train dataloader), inserts, then appends the new parameters to the
    Trainer's optimizer (Adam state kept, LR scheduler unchanged). The log is in `callback.grower.log`; every
    Trainer checkpoint folder gets the growth state (architecture + log) as `topo_growth.json`, and
    `restore(trainer, checkpoint)` rebuilds the grown model before `trainer.train(resume_from_checkpoint=...)`.
    Not supported with load_best_model_at_end: the best checkpoint may hold fewer layers than the model.

    Args:
        config: a `GrowthConfig` or dict.
        calibration_data: batches (dicts with labels) to score on; None uses the train dataloader.
        loss_fn: loss_fn(outputs, batch) when the model does not return outputs.loss.
    """

    def __init__(
        self,
        config: GrowthConfig | dict | None = None,
        calibration_data: Iterable | None = None,
        loss_fn: LossFn | None = None,
    ):
        self.config = config if isinstance(config, GrowthConfig) else GrowthConfig(**(config or {}))
        self.calibration_data, self.loss_fn = calibration_data, loss_fn
        self.grower: Grower | None = None
        self._restored = False  # restore() was called for the coming resumed train()

    def _grower(self, model, optimizer) -> Grower:
        if self.grower is None:
            self.grower = make_grower(model, self.config, self.loss_fn, optimizer)
        self.grower.model, self.grower.optimizer = unwrap(model), optimizer  # the Trainer may rewrap them
        return self.grower

    def _decide(self, state, model, optimizer, train_dataloader, val_loss: float | None) -> None:
        grower = self._grower(model, optimizer)
        calibration = self.calibration_data
        if calibration is None and train_dataloader is not None:
            calibration = first_batches(train_dataloader, self.config.calibration_batches)
        grower.maybe_grow(state.epoch, val_loss, calibration, step=state.global_step)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        """Uses that would grow nothing, or grow wrongly, fail here rather than after hours of training."""
        if self.config.needs_validation and args.eval_strategy == "no":
            raise ValueError(
                "this growth config decides on validation losses (patience or stop_patience) but the Trainer never "
                "evaluates: set eval_strategy='epoch' and pass an eval_dataset, or grow on a schedule"
            )
        if args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end is not supported with TopoGrowthCallback: the best checkpoint may hold fewer "
                "layers than the grown model, so its weights would not load onto it"
            )
        if state.global_step > 0 and not self._restored:
            raise ValueError(
                "resuming a run with TopoGrowthCallback: call callback.restore(trainer, checkpoint) before "
                "trainer.train(resume_from_checkpoint=checkpoint), so the grown layers and the growth state come back"
            )
        self._restored = False
        if model is not None:
            self._grower(model, optimizer)  # a model that cannot grow (e.g. a LoRA peft model) fails now
        return control

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if not self.config.needs_validation:
            self._decide(state, model, optimizer, train_dataloader, None)
        return control

    def on_evaluate(
        self, args, state, control, metrics=None, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        if self.config.needs_validation:
            if not metrics or "eval_loss" not in metrics:
                raise ValueError("TopoGrowthCallback with patience/stop_patience needs eval_loss from evaluation")
            self._decide(state, model, optimizer, train_dataloader, metrics["eval_loss"])
        return control

    def on_save(self, args, state, control, model=None, optimizer=None, **kwargs):
        grower = self._grower(model, optimizer) if model is not None else self.grower
        if grower is not None and state.is_world_process_zero:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_json(os.path.join(folder, GROWTH_STATE_NAME), grower.state_dict())
        return control

    def restore(self, trainer, checkpoint: str) -> None:
        """Call before `trainer.train(resume_from_checkpoint=checkpoint)` on a Trainer built around the *base* model.

        Creates the Trainer's optimizer on the base model (as the original run did), then inserts zero layers of the
        recorded shapes and appends their parameters in the recorded order, so both the model weights and the
        optimizer state in the checkpoint load onto the right tensors; the growth schedule carries on from there.
        A TopoModel must be the one the run started from (the same get_topo_model / head_only_topo_model call):
        its grown layers are added to its adapter.
        """
        path = os.path.join(checkpoint, GROWTH_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path} does not exist: the checkpoint was not written by a Trainer with a TopoGrowthCallback"
            )
        with open(path) as file:
            state = json.load(file)
        if trainer.optimizer is None:
            trainer.create_optimizer()
        rebuild(trainer.model, state, trainer.optimizer, self.config.param_group)
        self.grower = make_grower(trainer.model, self.config, self.loss_fn, trainer.optimizer)
        self.grower.load_state_dict(state)
        self._restored = True
