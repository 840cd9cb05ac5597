"""The attention switch: PivotKV attention functions for a model's decoder, until removed.

`enable_pivotkv_attention(model)` switches the decoder's attention implementation from
"eager" / "sdpa" to "retake_pivotkv_eager" / "retake_pivotkv_sdpa" (registered with
transformers' AttentionInterface, with the wrapped implementation's mask builder) and adds a
forward pre-hook on the decoder. For a forward whose cache is a PivotKVCache the hook passes a
`Step` (the cache and, during a planned prefill, the forward's plan) to every attention call
as a keyword argument, and moves the positions of later tokens by what the cache gave up
(re-forging, dropped frames). The attention function then runs the model's own eager or sdpa
attention with the held slots' mask columns rebuilt, and evicts after it. A hybrid model's
linear-attention modules get the forwards of retake_ops.hf.linear (their recurrent state is
carried exactly through planned forwards), and the cache lays out their state layers. Forwards with any
other cache pass straight through, so the switch is harmless for them. `remove()` (or leaving
the `with` block, or `disable_pivotkv_attention`) restores the model exactly; a copy of a
switched model (deepcopy, pickle) has the original attention (retake_ops.hf.copies).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import _compat, copies
from .cache import PivotKVCache
from .evict import evict
from .linear import LinearSwitch
from .parallel import TensorParallel
from .plan import StepPlan

PREFIX = "retake_pivotkv_"
STEP_KWARG = "retake_pivotkv_step"
_ATTR = "_retake_pivotkv_switch"
_registered = False


@dataclass
class Step:
    """What every attention call of one forward needs beyond its tensors."""

    cache: PivotKVCache
    plan: StepPlan | None = None  # None: not a planned prefill forward (decoding, plain calls)
    rope: torch.Tensor | None = None  # re-forging: RoPE positions [B, q, P] of the forward's tokens
    tp: TensorParallel | None = None  # the group over which the attention heads are sharded
    heads: int | None = None  # the model's query heads, checked against every rank's when several processes run
    host_valid: torch.Tensor | None = None  # the plan's real chunk tokens on the host, for linear-attention layers
    pending: list = field(default_factory=list)  # layer budgets: (layer, placed plan, scores) awaiting evict_pooled
    chunk: int = -1  # the id a ranked cache records for the tokens this forward's eviction keeps
    # A plain forward's new tokens that are real (bool [B, q]), when padding sits among them (e.g. between a
    # VideoMemory and the shorter questions of a batch): the cache holds the padding as masked slots and a
    # linear-attention layer runs each row on its real tokens. None: every new token is real.
    new_valid: torch.Tensor | None = None


def _make_attention(name: str):
    def pivotkv_attention(module, query, key, value, attention_mask, **kwargs):
        step = kwargs.pop(STEP_KWARG, None)
        base = _compat.base_attention(name, module)
        if step is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        layer = step.cache.layers[module.layer_idx]
        if key is not layer.keys:
            raise RuntimeError(
                f"PivotKV: the keys reaching the attention of layer {module.layer_idx} are not the ones its "
                "PivotKVCache layer returned from update(); this model transforms them in between, which PivotKV "
                "does not support")
        plan = None if step.plan is None else step.plan.on(key.device)
        layer.set_new(step.new_valid if plan is None else plan.valid, step.rope)
        mask = layer.attention_mask(attention_mask, query.shape[-2], kwargs.get("sliding_window"),
                                    float_mask=name == "eager", dtype=query.dtype)
        out = base(module, query, key, value, mask, **kwargs)
        layer.seen = True
        if plan is not None:
            evict(layer, plan, query, kwargs.get("scaling"), step)
        return out

    pivotkv_attention.__name__ = f"pivotkv_{name}_attention"
    return pivotkv_attention


def _register() -> None:
    global _registered
    if not _registered:
        for name in _compat.WRAPPABLE:
            _compat.register_attention(PREFIX + name, _make_attention(name), name)
        _registered = True


def _default_positions(kwargs: dict, args: tuple, cache: PivotKVCache) -> torch.Tensor:
    """Positions a decoder gives its tokens when none are passed: they follow the cache's length."""
    tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
    start = cache.get_seq_length()
    return torch.arange(start, start + tokens.shape[1], device=tokens.device)[None].expand(tokens.shape[0], -1)


def _padding(kwargs: dict, args: tuple) -> torch.Tensor | None:
    """bool [B, q]: which new tokens of a plain multi-token forward are real, from its 2-D attention mask, when
    some are not; else None."""
    mask = kwargs.get("attention_mask")
    tokens = kwargs.get("inputs_embeds")
    if tokens is None:
        tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
    q = tokens.shape[1]
    if q < 2 or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    new = mask[:, -q:].bool()
    return None if bool(new.all()) else new


def _decoder_hook(module, args, kwargs):
    cache = _compat.cache_from_kwargs(kwargs)
    if not isinstance(cache, PivotKVCache):
        return None
    cache.configure(getattr(getattr(module, "config", None), "layer_types", None))
    cache.forwards += 1
    step = kwargs.get(STEP_KWARG)
    if step is None:
        step = kwargs[STEP_KWARG] = Step(cache)
        step.new_valid = _padding(kwargs, args)
    if cache.position_shift is None and cache.rope is None:
        return args, kwargs
    positions = kwargs.get("position_ids")
    shift = cache.position_shift
    if positions is None:
        positions = _default_positions(kwargs, args, cache)
        shift = shift if cache.length_shift is None else cache.length_shift
    if shift is not None:
        rows = _compat.mrope_rows(positions)
        positions = positions.clone()
        positions[rows] = positions[rows] - shift.to(positions.device)[:, None]
    kwargs["position_ids"] = positions
    if cache.rope is not None:
        if cache.rope.components == 1 and positions.dim() != 2:
            raise ValueError(f"PivotKVCache(reforge_positions=True): position_ids must be [B, L] (1-D positions) "
                             f"for this model's 1-D RoPE, got shape {list(positions.shape)}")
        rope = positions[_compat.mrope_rows(positions)]
        rope = rope[..., None] if rope.dim() == 2 else rope.permute(1, 2, 0)
        step.rope = rope.expand(-1, -1, cache.rope.components)
    return args, kwargs


class AttentionSwitch:
    """The PivotKV attention of one model, on until remove() (also a context manager)."""

    def __init__(self, model):
        impl = _compat.attention_implementation(model)
        if impl not in _compat.WRAPPABLE:
            raise ValueError(
                f"PivotKV: model {type(model).__name__} uses attn_implementation={impl!r}; expected one of "
                f"{list(_compat.WRAPPABLE)} (load the model with attn_implementation='sdpa' or 'eager')")
        _register()
        self.model = model
        self.previous = impl
        _compat.set_attention_implementation(model, PREFIX + impl)
        self._hook = _compat.decoder(model).register_forward_pre_hook(_decoder_hook, with_kwargs=True)
        self._linear = LinearSwitch(model, STEP_KWARG)
        setattr(model, _ATTR, self)
        copies.hold(model, self, fix=disable_pivotkv_attention)

    @property
    def active(self) -> bool:
        return getattr(self.model, _ATTR, None) is self

    def remove(self) -> None:
        if not self.active:
            return
        self._hook.remove()
        self._linear.remove()
        _compat.set_attention_implementation(self.model, self.previous)
        delattr(self.model, _ATTR)
        copies.release(self.model, self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def enable_pivotkv_attention(model) -> AttentionSwitch:
    """Route the decoder's attention through the PivotKV functions; returns the (existing or new) switch.

    Raises ValueError when the model's attention implementation is neither "eager" nor "sdpa".
    """
    switch = getattr(model, _ATTR, None)
    return switch if switch is not None else AttentionSwitch(model)


def disable_pivotkv_attention(model) -> None:
    """Give the decoder back its original attention implementation (no-op when not switched)."""
    switch = getattr(model, _ATTR, None)
    if switch is not None:
        switch.remove()
