"""Finds the candidate positions of a model: after the embeddings (the input of the first block), after
every block, and inside an MLP head. Per-family paths first, then a structural search, or the user's
block path / position names. No math here.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from .sensitivity.capture import Tap

# Block lists of the supported families, most specific first.
KNOWN_BLOCK_PATHS = (
    "vit.layers",  # transformers >= 5 ViT
    "vit.encoder.layer",  # transformers 4 ViT
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "deit.encoder.layer",
    "encoder.layer",  # bare BertModel / ViTModel (v4)
    "layers",  # bare v5 ViTModel, Llama/Mistral decoders, custom stacks
    "transformer.h",  # GPT-2
    "h",  # bare GPT2Model
    "model.layers",  # Llama-family causal LMs
    "model.decoder.layers",
    "blocks",  # timm ViT and our reference models
    "_blocks",  # EfficientNet (lukemelas layout)
)
KNOWN_HEAD_PATHS = ("classifier", "head", "fc", "_fc", "score")
# The module whose output a single-Linear classifier reads (its pooled features), by family: BERT-family
# ...ForSequenceClassification (dropout of the pooled output), transformers ViT ...ForImageClassification (the final
# layernorm; the classifier reads its [CLS] token), EfficientNet-Lite (_dropout), timm (head_drop).
KNOWN_HEAD_INPUTS = ("dropout", "vit.layernorm", "_dropout", "head_drop")
HEAD_INPUT = "head_input"


class PositionsNotFoundError(ValueError):
    """No candidate positions could be found; the message says what was searched and how to fix it."""


@dataclass(frozen=True)
class Position(Tap):
    index: int = 0
    kind: str = "block"  # "embeddings" | "block" | "head"


def get_submodule(model: nn.Module, path: str, what: str = "module") -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        close = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
        hint = f" Did you mean one of {close}?" if close else ""
        raise PositionsNotFoundError(f"{what} path {path!r} does not exist in {type(model).__name__}.{hint}") from None


def _is_block_list(module: nn.Module, min_blocks: int = 2) -> bool:
    if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < min_blocks:
        return False
    return len({type(child) for child in module}) == 1


def find_block_list(model: nn.Module, block_path: str | None = None) -> tuple[str, list[nn.Module]]:
    """The model's stack of blocks: the user's path, a known family path, or the largest list of >= 2
    modules of one class (by parameter count)."""
    if block_path is not None:
        blocks = get_submodule(model, block_path, "block_path")
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            raise PositionsNotFoundError(
                f"block_path {block_path!r} is a {type(blocks).__name__}, not a non-empty nn.ModuleList or "
                "nn.Sequential of blocks; point it at the list that holds the blocks"
            )
        return block_path, list(blocks)
    for path in KNOWN_BLOCK_PATHS:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        if _is_block_list(module, min_blocks=1):  # a known path may hold a single block
            return path, list(module)
    candidates = [
        (sum(p.numel() for p in module.parameters()), name, module)
        for name, module in model.named_modules()
        if _is_block_list(module) and sum(p.numel() for p in module.parameters()) > 0
    ]
    if candidates:
        _, name, module = max(candidates, key=lambda c: c[0])
        return name, list(module)
    raise PositionsNotFoundError(
        f"no block list found in {type(model).__name__}: searched the paths {list(KNOWN_BLOCK_PATHS)} and every "
        "nn.ModuleList / nn.Sequential holding >= 2 modules of one class with parameters. Name the block list "
        "with ScoringConfig(block_path='path.to.blocks') or list the positions with "
        "ScoringConfig(positions=['module.name', ...])."
    )


def find_head(model: nn.Module, head_path: str | None) -> tuple[str | None, nn.Module | None]:
    if head_path is not None:
        return head_path, get_submodule(model, head_path, "head_path")
    for candidate in KNOWN_HEAD_PATHS:
        try:
            return candidate, model.get_submodule(candidate)
        except AttributeError:
            continue
    return None, None


def head_input_position(model: nn.Module, head_path: str | None, index: int) -> list[Position]:
    """The input of a single-Linear classifier (the pooled features), as the output of the module that feeds it:
    a new layer there is the paper's transfer setting, a layer added to the MLP head of a frozen model. The tap is
    the feeding module's output rather than the classifier's input, so the classifier itself can be trained and
    saved whole (modules_to_save) without carrying the layer."""
    path, head = find_head(model, head_path)
    head = getattr(head, "original_module", head)  # seen through peft's modules_to_save wrapper
    if not isinstance(head, nn.Linear):
        return []
    for candidate in KNOWN_HEAD_INPUTS:
        try:
            feeder = model.get_submodule(candidate)
        except AttributeError:
            continue
        return [Position(HEAD_INPUT, feeder, "output", index=index, kind="head_input")]
    return []


def head_positions(model: nn.Module, head_path: str | None, start_index: int) -> list[Position]:
    """Positions strictly inside an MLP head: after each child that feeds a later Linear, once a Linear
    has already been applied (the head's own input is the last block's position, not a head one); for a
    single-Linear classifier, its input (`head_input_position`)."""
    path, head = find_head(model, head_path)
    if not isinstance(head, nn.Sequential):
        return head_input_position(model, head_path, start_index)
    children = list(head.named_children())
    linear_seen, positions = False, []
    for i, (name, child) in enumerate(children[:-1]):
        linear_seen = linear_seen or isinstance(child, nn.Linear)
        if linear_seen and isinstance(children[i + 1][1], nn.Linear):
            positions.append(
                Position(f"{path}.{name}", child, "output", index=start_index + len(positions), kind="head")
            )
    return positions


def config_positions(model: nn.Module, config, named: list[str] | None = None) -> list[Position]:
    """The positions a scoring config lets compete (its block_path, positions, include_head, head_path,
    exclude_positions and include_embeddings), or the `named` ones (an adapter's fixed target_modules) as they are."""
    return find_positions(
        model, config.block_path, named or config.positions, config.include_head, config.head_path,
        exclude=None if named else config.exclude_positions, include_embeddings=config.include_embeddings,
    )  # fmt: skip


def find_positions(
    model: nn.Module,
    block_path: str | None = None,
    positions: list[str] | None = None,
    include_head: bool = True,
    head_path: str | None = None,
    exclude: list[str] | None = None,
    include_embeddings: bool = True,
) -> list[Position]:
    """All candidate positions in depth order but the `exclude`d ones, or the named ones (in the order of the
    model)."""
    if positions is not None and not positions:
        raise PositionsNotFoundError("positions is an empty list: name at least one position, or pass None for all")
    if exclude:
        _check_exclusions(model, block_path, positions, head_path, exclude)
    try:
        path, blocks = find_block_list(model, block_path)
    except PositionsNotFoundError:
        if positions is None or "embeddings" in positions or block_path is not None:
            raise
        path, blocks = None, None
    found: list[Position] = []
    if blocks is not None:
        if include_embeddings or (positions is not None and "embeddings" in positions):  # asked for by name
            found.append(Position("embeddings", blocks[0], "input", index=0, kind="embeddings"))
        found += [Position(f"{path}.{i}", block, "output", index=i + 1, kind="block") for i, block in enumerate(blocks)]
        if include_head or (positions is not None and HEAD_INPUT in positions):  # asked for by name
            found += head_positions(model, head_path, len(blocks) + 1)  # depth: after the embeddings and blocks
    if positions is None:
        found = [p for p in found if p.name not in (exclude or ())]  # depth indices stay those of the model
        if not found and exclude:
            raise PositionsNotFoundError(f"exclude_positions {list(exclude)} leaves no position to score")
        return found
    by_name = {p.name: p for p in found}
    chosen = []
    for name in positions:
        if name in by_name:
            chosen.append(by_name[name])
        else:
            module = get_submodule(model, name, "position")
            chosen.append(Position(name, module, "output", kind="custom"))
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    last = {"embeddings": -1, HEAD_INPUT: len(order)}  # not module paths: first and last in depth
    chosen.sort(key=lambda p: last[p.name] if p.name in last else order[p.name])
    return [Position(p.name, p.module, p.where, index=i, kind=p.kind) for i, p in enumerate(chosen)]


def _check_exclusions(model, block_path, positions, head_path, exclude) -> None:
    """Every excluded name is a position of the model (a typo would silently exclude nothing), and none is also
    named in `positions`."""
    names = [p.name for p in find_positions(model, block_path, None, True, head_path)]
    unknown = [name for name in exclude if name not in names]
    if unknown:
        raise PositionsNotFoundError(
            f"exclude_positions names {unknown}, which are not candidate positions of this model; they are {names}"
        )
    clash = sorted(set(positions or ()) & set(exclude))
    if clash:
        raise ValueError(f"{clash} are both in positions and in exclude_positions: drop them from one of them")
