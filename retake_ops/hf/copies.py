"""Copies of a model that retake_ops changed are plain models, never bound to the original.

An instance patch (apply_retake) puts its forward, generate and generation hook on the model,
and the attention switch (a PivotKV prefill) changes the decoder's attention implementation
and adds a pre-hook; both close over the model they were made for. Copied as they are, a
`copy.deepcopy` would run the original model's forward and a pickle would hold functions
bound to it. So while anything of retake_ops is on a model, the model carries its own
`__deepcopy__` and `__reduce_ex__` (looked up on the instance by copy and pickle): they copy
the model as it was before, with each patched attribute's earlier value and the original
attention; `apply_retake(copy, ...)` patches a copy on its own.

`copy.deepcopy(model)` copies everything, as usual. `pickle` / `torch.save(model)` pickle a
copy whose tensors are the model's own (no second copy of the weights), and `copy.copy(model)`
is such a copy too. The holders (the instance patch, the attention switch) register what a
copy must get back and release the guard when they are removed, which then leaves the model
exactly as it was.
"""
from __future__ import annotations

import copy
import itertools

ABSENT = object()  # an attribute that was not on the instance before


class _Guard:
    def __init__(self, model):
        self.model = model
        self.holders: dict[object, tuple[dict, object]] = {}  # holder -> ({attribute: earlier value}, fix)

    def deepcopy(self, memo: dict):
        """The model copied as it was before retake_ops touched it."""
        model = self.model
        state = model.__getstate__()
        for name in ("__deepcopy__", "__reduce_ex__"):
            state.pop(name, None)
        for attributes, _ in self.holders.values():
            for name, earlier in attributes.items():
                if earlier is ABSENT:
                    state.pop(name, None)
                else:
                    state[name] = earlier
        cls = type(model)
        clone = cls.__new__(cls)
        memo[id(model)] = clone
        clone.__setstate__(copy.deepcopy(state, memo))
        for _, fix in self.holders.values():
            if fix is not None:
                fix(clone)
        return clone

    def reduce_ex(self, protocol: int):
        """What pickle stores: the model as it was before, sharing this model's tensors."""
        model = self.model
        memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        return self.deepcopy(memo).__reduce_ex__(protocol)


def hold(model, holder, attributes: dict | None = None, fix=None) -> None:
    """While `holder` is registered, copies of `model` get `attributes` ({name: earlier value, or
    ABSENT}) in place of the model's own, and `fix(copy)` runs on each copy."""
    guard = model.__dict__.get("__deepcopy__")
    guard = getattr(guard, "__self__", None)
    if not isinstance(guard, _Guard):
        guard = _Guard(model)
        model.__deepcopy__ = guard.deepcopy
        model.__reduce_ex__ = guard.reduce_ex
    guard.holders[holder] = (dict(attributes or {}), fix)


def release(model, holder) -> None:
    """Forget `holder`; the last one out takes the guard off the model."""
    guard = getattr(model.__dict__.get("__deepcopy__"), "__self__", None)
    if not isinstance(guard, _Guard):
        return
    guard.holders.pop(holder, None)
    if not guard.holders:
        del model.__deepcopy__, model.__reduce_ex__

