"""Repeated forward passes over the same batches that differ only from some point of the stream on (a line
search trying step sizes of a layer inserted after block i) need not recompute what comes before that point.

`PrefixReplay` records, on one ordinary pass, what the modules before that point return, and on later passes
makes them return the record instead of computing it. Their forward hooks still run (an adapter attached
after the last skipped module transforms the replayed output as it would the computed one). Knows modules,
not model families: the caller names the modules, in the order the model calls them.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

from torch import nn


class PrefixReplay:
    """Records the outputs of `modules` (called in this order by the model's forward, each fed by the one before)
    per batch, then replays them.

    Only the last module's output reaches the rest of the model; when every module is of the last one's class,
    the earlier ones replay that output too (type-compatible, and ignored by the replayed last module), so only
    the last module's outputs are held: one hidden state per batch.
    """

    def __init__(self, modules: list[nn.Module]):
        self.modules = modules
        last = type(modules[-1])
        self.holds_last_only = all(type(module) is last for module in modules)
        self.records: dict[int, dict[int, list]] = {}  # batch -> module index -> outputs by call
        self.batch = 0
        self._calls: dict[int, int] = {}

    def start_batch(self, index: int) -> None:
        self.batch, self._calls = index, {}

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """The model computes as usual; what the modules return is kept."""
        with self._patched(self._recorder):
            yield

    @contextlib.contextmanager
    def replaying(self) -> Iterator[None]:
        """The modules return what they returned on the recorded pass of the same batch, without computing."""
        with self._patched(self._replayer):
            yield

    def _recorder(self, index: int, forward):
        kept = not self.holds_last_only or index == len(self.modules) - 1

        def record(*args, **kwargs):
            output = forward(*args, **kwargs)
            if kept:
                self.records.setdefault(self.batch, {}).setdefault(index, []).append(_shallow_copy(output))
            return output

        return record

    def _replayer(self, index: int, forward):
        source = len(self.modules) - 1 if self.holds_last_only else index

        def replay(*args, **kwargs):
            call = self._calls.get(index, 0)
            self._calls[index] = call + 1
            outputs = self.records[self.batch][source]
            return _shallow_copy(outputs[min(call, len(outputs) - 1)])

        return replay

    @contextlib.contextmanager
    def _patched(self, make) -> Iterator[None]:
        """Each module's forward replaced on the instance (hooks still run around it), restored afterwards, also
        when an instance-level forward was already there (e.g. Accelerate's device hooks)."""
        saved = []
        try:
            for index, module in enumerate(self.modules):
                saved.append((module, module.__dict__.get("forward")))
                module.forward = make(index, module.forward)
            yield
        finally:
            for module, previous in saved:
                if previous is None:
                    del module.forward
                else:
                    module.forward = previous


def _shallow_copy(value):
    """A new container around the same tensors: a hook that edits a returned ModelOutput or list in place must not
    edit the record."""
    if isinstance(value, (list, dict)) or hasattr(value, "to_tuple"):
        return copy.copy(value)
    return value
