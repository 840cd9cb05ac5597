"""ReTaKe on a VideoLLM in one line: apply_retake(model, RetakeConfig(...)), then model.generate(...).

The patch replaces the model's forward (one instance, or the class for every model built
later, Liger-style) with one that runs the ReTaKe prefill (retake_ops.hf.videollm) when a call
brings videos and an empty cache, and otherwise calls the original forward; decoding then
continues on the PivotKVCache the prefill returned. It also wraps generate(), so that options
the prefill cannot serve on videos (use_cache=False, static and other cache kinds,
prefill_chunk_size) are refused by name before generate() does any work; the forward refuses
the same for direct calls. The handle's remove() (or leaving its `with` block) restores the
model exactly, and copies of an instance-patched model are unpatched (retake_ops.hf.copies).
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache

from ..checks import FLOAT_DTYPES, check_int, check_ratio
from . import _compat, copies
from .attention import disable_pivotkv_attention, enable_pivotkv_attention
from .cache import PivotKVCache, check_layer_budgets, check_pivot_overflow
from .memory import VideoMemory, model_config, tensor_parallel_rank
from .models import FAMILIES
from .videollm import RetakeReport, retake_prefill

_MARK = "_retake_handle"


@dataclass(frozen=True)
class RetakeConfig:
    """What ReTaKe does to a VideoLLM's videos. Every field is checked when the config is made.

    Args:
        frame_keep_ratio: DPSelect keeps target_frames(T, ratio) = max(1, round(ratio * T)) of a
            video's T frames (temporal groups for the Qwen families), keyframes first. 1.0 keeps
            every frame and only marks the keyframes (their tokens become pivots).
        window: DPSelect's peak window, odd (a frame is a keyframe when its distance to the previous
            frame is the first maximum of the `window` frames around it).
        per_patch: DPSelect per patch position (ReTaKe's patch_sync=False): each patch position keeps
            its own frames; the LLM sees `k` frames whose patches come from different frames.
        kv_keep_ratio: PivotKV keeps keep_tokens(n, ratio) = max(1, int(ratio * n)) of each chunk's n
            video tokens per row. Default 0.25 unless max_kv_tokens is given.
        max_kv_tokens: instead of kv_keep_ratio, a budget of video tokens per row: ratio =
            min(1, max_kv_tokens / video tokens after DPSelect) (ReTaKe's dynamic ratio). The
            tokens held come close to it: every chunk keeps at least one, int() rounds down per
            chunk, and pivot_overflow="keep" may go over.
        chunk_frames: raw video frames per prefill chunk (ReTaKe's chunked_prefill_frames); for the
            Qwen families a chunk holds chunk_frames // temporal_patch_size temporal groups (at least 1).
        question_guided: score each chunk with its own queries plus the question's (the text after
            the last video), run after the chunk at positions continuing right after it.
        force_pivots: keyframe tokens rank first in PivotKV.
        pivot_overflow: when a chunk's pivots outnumber its budget: "evict" (keep the best-scored
            pivots), "keep" (keep them all, over budget) or "raise". The first two warn once per prefill.
        reforge_positions: ReTaKe's position re-forging of the kept keys (see PivotKVCache).
        progress: a progress bar over the prefill's chunks.
        temporal_budgets: AdaReTaKe's temporal budgets: each prefill chunk of a video keeps keep_tokens(n_c, r_c)
            of its n_c video tokens, r_c larger for chunks whose mean feature differs more from their
            neighbours' and averaging the row's ratio r over the video's chunks, within chunk_ratio_range
            (see retake_ops.hf.budgets). A chunk then never holds frames of two videos. Off: every chunk
            keeps keep_tokens(n, r).
        chunk_ratio_range: (lo, hi), 0 < lo <= hi <= 1, the range of a chunk's ratio under temporal budgets;
            it must hold the row's ratio r.
        layer_budgets: "even" (every layer keeps a chunk's budget K) or "adakv" (AdaReTaKe's layer budgets:
            layers whose scores dominate the top layers * K of all layers' scores keep more, the budgets
            summing to layers * K; see PivotKVCache). A hybrid model shares them among its full-attention
            layers. Not with reforge_positions.
    """

    frame_keep_ratio: float = 1.0
    window: int = 3
    per_patch: bool = False
    kv_keep_ratio: float | None = None
    max_kv_tokens: int | None = None
    chunk_frames: int = 32
    question_guided: bool = True
    force_pivots: bool = True
    pivot_overflow: str = "evict"
    reforge_positions: bool = False
    progress: bool = False
    temporal_budgets: bool = False
    chunk_ratio_range: tuple[float, float] = (1e-3, 1.0)
    layer_budgets: str = "even"

    def __post_init__(self):
        # Numbers of any type (numpy, 0-d tensors) are stored as Python's, so a config compares, hashes
        # and prints the same whatever type its numbers were given in.
        def store(name, value):
            object.__setattr__(self, name, value)

        store("frame_keep_ratio", check_ratio("RetakeConfig", self.frame_keep_ratio, "frame_keep_ratio"))
        store("window", check_int("RetakeConfig", "window", self.window, minimum=1))
        if self.window % 2 != 1:
            raise ValueError(f"RetakeConfig: window must be odd, got {self.window}")
        if self.kv_keep_ratio is not None:
            store("kv_keep_ratio", check_ratio("RetakeConfig", self.kv_keep_ratio, "kv_keep_ratio"))
        if self.max_kv_tokens is not None:
            store("max_kv_tokens", check_int("RetakeConfig", "max_kv_tokens", self.max_kv_tokens, minimum=1))
        if self.kv_keep_ratio is not None and self.max_kv_tokens is not None:
            raise ValueError(f"RetakeConfig: give kv_keep_ratio or max_kv_tokens, not both (got kv_keep_ratio="
                             f"{self.kv_keep_ratio}, max_kv_tokens={self.max_kv_tokens})")
        store("chunk_frames", check_int("RetakeConfig", "chunk_frames", self.chunk_frames, minimum=1))
        for name in ("per_patch", "question_guided", "force_pivots", "reforge_positions", "temporal_budgets",
                     "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"RetakeConfig: {name} must be a bool, got {getattr(self, name)!r}")
        check_pivot_overflow(self.pivot_overflow, "RetakeConfig")
        check_layer_budgets(self.layer_budgets, self.reforge_positions, "RetakeConfig")
        span = self.chunk_ratio_range
        if not isinstance(span, (tuple, list)) or len(span) != 2:
            raise ValueError(f"RetakeConfig: chunk_ratio_range must be a pair (lo, hi), got {span!r}")
        lo, hi = (check_ratio("RetakeConfig", x, f"chunk_ratio_range[{i}]") for i, x in enumerate(span))
        if lo > hi:
            raise ValueError(f"RetakeConfig: chunk_ratio_range must have lo <= hi, got {(lo, hi)}")
        store("chunk_ratio_range", (lo, hi))
        if self.temporal_budgets and self.max_kv_tokens is None:
            self.check_chunk_ratio(self.kv_ratio(0))

    def check_chunk_ratio(self, ratio: float) -> None:
        """ValueError unless the temporal budgets' chunk_ratio_range holds a row's keep ratio."""
        lo, hi = self.chunk_ratio_range
        if not lo <= ratio <= hi:
            source = (f"max_kv_tokens={self.max_kv_tokens} gives a row the ratio" if self.max_kv_tokens is not None
                      else "kv_keep_ratio is")
            raise ValueError(f"RetakeConfig: temporal_budgets=True needs chunk_ratio_range to hold the keep ratio "
                             f"its chunks average to, but {source} {ratio} and chunk_ratio_range is {(lo, hi)}")

    def kv_ratio(self, video_tokens: int) -> float:
        """The PivotKV keep ratio of a row with this many video tokens (after DPSelect)."""
        if self.max_kv_tokens is not None:
            return 1.0 if video_tokens == 0 else min(1.0, self.max_kv_tokens / video_tokens)
        return 0.25 if self.kv_keep_ratio is None else self.kv_keep_ratio


def _config(config, overrides) -> RetakeConfig:
    if config is None:
        config = RetakeConfig()
    elif not isinstance(config, RetakeConfig):
        raise ValueError(f"apply_retake: config must be a RetakeConfig, got {type(config).__name__}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(RetakeConfig)})
    if unknown:
        raise ValueError(f"apply_retake: unknown RetakeConfig field(s) {unknown}")
    return dataclasses.replace(config, **overrides)


def _named(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """Every argument of a forward call by name (positional ones bound to their parameters)."""
    bound = signature.bind_partial(*args, **kwargs).arguments
    named = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


class RetakeHandle:
    """An applied ReTaKe patch: `remove()` (or leaving its `with` block) undoes it.

    `report` is the latest prefill's RetakeReport (per video: frames kept, keyframes, tokens;
    per layer: the input_ids columns of the held tokens); `prefills` counts them. Only the
    latest report is kept, so a class-level patch in a long evaluation does not grow.
    """

    def __init__(self, family, config: RetakeConfig, target, instance: bool):
        self.family = family
        self.config = config
        self.target = target  # the model (instance patch) or its class (class-level patch)
        self.instance = instance
        self.report: RetakeReport | None = None
        self.prefills = 0
        self._models = weakref.WeakSet()
        self._checked = weakref.WeakSet()
        # (owner, attribute, previous or copies.ABSENT, the value the patch set)
        self._restore: list[tuple[object, str, object, object]] = []
        self._originals = {}  # method name -> original(model), the method the patch replaced, bound to model
        self.active = False

    def _set(self, owner, name: str, value) -> None:
        """owner.name = value, remembering what remove() puts back (or deletes)."""
        self._restore.append((owner, name, owner.__dict__.get(name, copies.ABSENT), value))
        setattr(owner, name, value)

    def _wrap(self, name: str, make) -> None:
        """Replace method `name` of the target by make(original): original(model) is the method it
        replaces, bound to `model`. An instance patch holds the target itself, which is why its copies
        must not keep the patch (retake_ops.hf.copies)."""
        found = getattr(self.target, name)
        bound_to_target = isinstance(found, types.MethodType) and found.__self__ is self.target
        static = isinstance(inspect.getattr_static(self.target, name), staticmethod)  # 5.17's generation hook
        if static or (self.instance and not bound_to_target):  # or an instance attribute (e.g. another wrapper's)
            def original(model):
                return found
        else:
            function = getattr(found, "__func__", found)

            def original(model):
                return types.MethodType(function, model)

        wrapped = make(original)
        self._originals[name] = original

        # Once removed, a patched method that something else still holds (a wrapper installed after
        # the patch, e.g. accelerate's hooks) is the original again.
        def patched(model, *args, **kwargs):
            if not self.active:
                return original(model)(*args, **kwargs)
            return wrapped(model, *args, **kwargs)

        patched.__signature__ = inspect.signature(wrapped)
        setattr(patched, _MARK, self)
        patched.__doc__ = getattr(found, "__doc__", None)
        self._set(self.target, name, types.MethodType(patched, self.target) if self.instance else patched)

    def _install(self) -> None:
        target, handle = self.target, self
        cls = type(target) if self.instance else target
        if getattr(target.forward, _MARK, None) is not None:
            raise ValueError(f"apply_retake: {self._name()} is already patched; remove() that handle first")
        forward_signature = inspect.signature(cls.forward)
        generate_signature = inspect.signature(cls.generate)
        pre_encodes = _compat.pre_encodes_vision(cls.forward)  # read before the patched forward hides it

        def make_forward(original):
            def forward(model, *args, **kwargs):
                call = original(model)
                named = _named(forward_signature, (model, *args), kwargs)
                named.pop("self", None)
                cache = _compat.cache_from_kwargs(named)
                if (named.get("mm_encoder_outputs") or {}).get("video") is not None:
                    raise ValueError("apply_retake: the ReTaKe prefill runs the vision tower itself; pass "
                                     "pixel_values_videos (and its grid), not mm_encoder_outputs")
                if handle.family.has_video(named) and (cache is None or cache.get_seq_length() == 0):
                    check_prefill_call(model, named, cache)
                    handle._check(model)
                    handle._models.add(model)
                    out, handle.report = retake_prefill(model, handle.family, handle.config, named, call)
                    handle.prefills += 1
                    return out
                if isinstance(cache, VideoMemory):
                    handle._continue(model, cache, named)
                return call(**named)

            # generate() reads forward's signature to choose what to pass: the patched one takes raw pixels.
            forward.__signature__ = _compat.patched_forward_signature(cls.forward)
            return forward

        def make_generate(original):
            def generate(model, *args, **kwargs):
                named = _named(generate_signature, (model, *args), kwargs)
                cache = _compat.cache_from_kwargs(named)
                if isinstance(cache, VideoMemory):
                    check_memory_generate_options(model, generate_signature, named)
                    ids = named.get("input_ids")
                    handle._continue(model, cache, named, named.get("inputs") if ids is None else ids)
                if not handle.family.has_video(named):
                    return original(model)(*args, **kwargs)
                check_generate_options(model, generate_signature, named)
                prefills = handle.prefills
                out = original(model)(*args, **kwargs)
                if handle.prefills == prefills and (cache is None or cache.get_seq_length() == 0):
                    raise RuntimeError(
                        f"apply_retake: generate() on {type(model).__name__} never reached the patched forward, so "
                        "its answer is the unpatched model's: something replaced model.forward before the class was "
                        "patched (e.g. accelerate's device_map hooks); patch the model itself with "
                        "apply_retake(model, ...)")
                return out

            generate.__signature__ = generate_signature
            return generate

        self._wrap("forward", make_forward)
        self._wrap("generate", make_generate)
        if self.family.video_inputs and (pre_encodes or not _compat.expands_videos(cls)):
            # The video inputs reach generate()'s generic row-wise repeat for beams and several sequences
            # (it no longer encodes them itself, or the class has no repeat of its own): the family
            # repeats them per video.
            def make_expand(original):
                def expand(model, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
                    videos = {name: model_kwargs.pop(name) for name in handle.family.video_inputs
                              if name in model_kwargs}
                    input_ids_out, model_kwargs = original(model)(
                        expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids,
                        **model_kwargs)
                    if expand_size > 1 and input_ids is not None:
                        videos = handle.family.expand_videos(model, input_ids, videos, expand_size)
                    model_kwargs.update(videos)
                    return input_ids_out, model_kwargs

                return expand

            self._wrap(_compat.EXPAND_HOOK, make_expand)
        if self.instance:
            copies.hold(target, self, {name: earlier for owner, name, earlier, _ in self._restore if owner is target})
        self.active = True

    def _name(self) -> str:
        return type(self.target).__name__ if self.instance else self.target.__name__

    def _check(self, model) -> None:
        if model in self._checked:
            return
        check_model(model, self.family, self.config)
        self._checked.add(model)

    def _model(self, model, what: str):
        """The model a call of `what` runs on: the patched instance, or a model of the patched class."""
        if not self.active:
            raise ValueError(f"RetakeHandle.{what}: the handle was removed; apply_retake again")
        if self.instance:
            if model is not None and model is not self.target:
                raise ValueError(f"RetakeHandle.{what}: this handle patches one model instance; call it without "
                                 "model= (or with that model)")
            return self.target
        if model is None or not isinstance(model, self.target):
            raise ValueError(f"RetakeHandle.{what}: a class-level handle needs the model: {what}(model, ...), a "
                             f"{self.target.__name__}; got {type(model).__name__ if model is not None else None}")
        return model

    def _encode_into(self, model, memory: VideoMemory, inputs: dict, what: str) -> None:
        forward = self._originals["forward"](model)
        named = _named(inspect.signature(forward), (), inputs)
        if not self.family.has_video(named):
            raise ValueError(f"RetakeHandle.{what}: got no video ({sorted(inputs)}); pass the processor's outputs "
                             "for a prompt with a video")
        if _compat.cache_from_kwargs(named) is not None:
            raise ValueError(f"RetakeHandle.{what}: pass no cache; the memory is the cache")
        check_prefill_call(model, named, None)
        self._check(model)
        self._models.add(model)
        if "logits_to_keep" in inspect.signature(forward).parameters:
            named.setdefault("logits_to_keep", 1)
        _, self.report = retake_prefill(model, self.family, self.config, named, forward, memory=memory)
        memory.trim()
        self.prefills += 1

    def encode(self, model=None, /, **inputs) -> VideoMemory:
        """The ReTaKe prefill of a prompt with a video, kept as a VideoMemory to answer questions on.

            memory = handle.encode(**processor_outputs)     # the prompt ends after the video (or later)
            out = model.generate(**memory.question_inputs([question_ids]), max_new_tokens=32)

        inputs: the processor's outputs, as for generate(). model: only for a class-level patch. With
        question_guided=True the chunks are scored with the text after the last video of this prompt.
        """
        model = self._model(model, "encode")
        memory = VideoMemory(self.config, self.family.name, model.config.model_type)
        memory.cache_name = _compat.cache_kwarg(model.forward)
        memory.model_config = model_config(model)
        memory.tensor_parallel_rank = tensor_parallel_rank(model)
        self._encode_into(model, memory, inputs, "encode")
        return memory

    def extend(self, memory: VideoMemory, model=None, /, **inputs) -> VideoMemory:
        """Append a segment (its processor outputs: its own prompt piece with its frames) to `memory`, in
        place: DPSelect on the segment's video, chunked prefill and PivotKV continuing after the memory's
        last position. With max_kv_tokens every row then holds at most that many video tokens per layer
        (VideoMemory.bound). Returns the memory."""
        model = self._model(model, "extend")
        if not isinstance(memory, VideoMemory):
            raise ValueError(f"RetakeHandle.extend: memory must be a VideoMemory (from encode or load_memory), got "
                             f"{type(memory).__name__}")
        self._check_memory(memory, "RetakeHandle.extend")
        mine, theirs = dataclasses.replace(self.config, progress=False), dataclasses.replace(memory.config,
                                                                                              progress=False)
        if mine != theirs:
            field = next(f.name for f in dataclasses.fields(mine) if getattr(mine, f.name) != getattr(theirs, f.name))
            raise ValueError(f"RetakeHandle.extend: the memory was encoded with {field}="
                             f"{getattr(theirs, field)!r}, the handle has {field}={getattr(mine, field)!r}; extend "
                             "a memory under the config it was encoded with")
        if memory.get_seq_length() != memory.input_ids.shape[1]:
            raise ValueError(f"RetakeHandle.extend: the memory holds {memory.get_seq_length()} columns but its prompt "
                             f"has {memory.input_ids.shape[1]}: it went on to answer a question. Extend the memory "
                             "itself and answer on memory.copy()")
        if self.config.max_kv_tokens is not None and self.config.reforge_positions:
            raise ValueError("RetakeHandle.extend: max_kv_tokens with reforge_positions=True: the bound evicts held "
                             "keys after their positions were re-forged, which would leave gaps re-forging never "
                             "closes; extend a memory encoded with one of them")
        ids = inputs.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] != memory.rows:
            raise ValueError(f"RetakeHandle.extend: input_ids has {ids.shape[0]} rows but the memory {memory.rows}; a "
                             "segment brings one row per row of the memory")
        shifts = memory.position_shift, memory.length_shift
        seen = [(layer.cumulative_length, layer.length) for layer in memory.kv_layers]
        try:
            self._encode_into(model, memory, inputs, "extend")
        except BaseException as err:
            if [(layer.cumulative_length, layer.length) for layer in memory.kv_layers] == seen:
                memory.position_shift, memory.length_shift = shifts  # nothing ran: the memory is as it was
                memory._decoding = None
            else:
                memory.broken = f"an extend failed half way ({type(err).__name__}: {err})"
            raise
        return memory

    def _check_memory(self, memory: VideoMemory, what: str) -> None:
        memory.check_usable(what)
        if memory.family != self.family.name:
            raise ValueError(f"{what}: the memory was encoded by a {memory.family} model; this handle patches "
                             f"{self.family.name}")

    def _continue(self, model, memory: VideoMemory, named: dict, input_ids=None) -> None:
        """Before a call continues on `memory`: the model's decoding state is the memory's."""
        self._check_memory(memory, "apply_retake")
        if self.family.has_video(named):
            raise ValueError("apply_retake: got video inputs with a VideoMemory, which holds its video already; "
                             "pass the prompt's and the question's ids without pixel inputs (memory.question_inputs), "
                             "or grow the memory with handle.extend(memory, **segment)")
        if input_ids is not None:
            prompt = memory.input_ids
            if input_ids.shape[0] != prompt.shape[0]:
                raise ValueError(f"apply_retake: input_ids has {input_ids.shape[0]} rows but the VideoMemory "
                                 f"{prompt.shape[0]}; build the batch with memory.question_inputs(questions) (or "
                                 "memory.repeat(n))")
            if input_ids.shape[1] < prompt.shape[1] or not torch.equal(input_ids[:, :prompt.shape[1]].cpu(), prompt):
                raise ValueError("apply_retake: input_ids must begin with the ids of the prompt the VideoMemory "
                                 "encoded (memory.input_ids), followed by the question's")
        enable_pivotkv_attention(model)
        self._models.add(model)
        # The text after the prompt goes where the model puts it after the full prompt (memory.text_short, once
        # the shift moves it down), as generate() on prompt and question at once would place it. Set on every
        # call: another memory or prefill may have run since.
        self.family.set_decoding_state(model, *memory.decoding_args(memory.position_shift.device))

    def remove(self) -> None:
        """Restore the original forward, generate (and generation hook) and attention implementation (idempotent)."""
        if not self.active:
            return
        for owner, name, previous, value in reversed(self._restore):
            if owner.__dict__.get(name) is not value:
                continue  # replaced since: what replaced it still calls ours, which now passes straight through
            if previous is copies.ABSENT:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        self._restore.clear()
        if self.instance:
            copies.release(self.target, self)
        for model in list(self._models):
            disable_pivotkv_attention(model)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return f"RetakeHandle({self.family.name}, {self._name()}, {state}, {self.config})"


def handle_of(model) -> RetakeHandle | None:
    """The active handle that patches `model` (its instance or its class), or None."""
    handle = getattr(getattr(model, "forward", None), _MARK, None)
    return handle if handle is not None and handle.active else None


def check_model(model, family, config: RetakeConfig) -> None:
    """ValueError for a model the ReTaKe prefill cannot run exactly."""
    impl = _compat.attention_implementation(model)
    if impl not in _compat.WRAPPABLE and not str(impl).startswith("retake_pivotkv_"):
        raise ValueError(f"apply_retake: {type(model).__name__} uses attn_implementation={impl!r}; expected one of "
                         f"{list(_compat.WRAPPABLE)} (load the model with attn_implementation='sdpa' or 'eager')")
    layer_types = getattr(_compat.decoder_config(model), "layer_types", None) or []
    # Linear-attention layers (hybrid models) keep a recurrent state that PivotKV never evicts from.
    sliding = sorted({t for t in layer_types if t not in ("full_attention", "linear_attention")})
    if sliding:
        raise ValueError(f"apply_retake: {type(model).__name__} has {sliding} decoder layers; the ReTaKe prefill "
                         "supports full and linear attention only (set use_sliding_window=False)")
    if config.reforge_positions and not family.supports_reforge:
        raise ValueError(f"apply_retake: reforge_positions=True is not available for {family.name}; use "
                         "reforge_positions=False")
    if config.per_patch and not family.supports_per_patch:
        raise ValueError(f"apply_retake: per_patch=True is not available for {family.name}: a per-patch frame "
                         "would have no timestamp; use per_patch=False")


_NO_CACHE = ("apply_retake: use_cache=False with videos: the ReTaKe prefill leaves the compressed video in a KV "
             "cache that decoding continues on, so it cannot run without one; drop use_cache=False (or remove() "
             "the patch to run the model without a cache)")
_CACHE_IMPLEMENTATIONS = (None, "dynamic")  # generate()'s plain DynamicCache, which the prefill replaces


def check_cache(cache) -> None:
    """ValueError for a cache the ReTaKe prefill cannot take the place of: anything but none or the plain,
    empty DynamicCache that generate() makes. The prefill returns its own PivotKVCache, which drops
    evicted video tokens; a static cache cannot, and an offloaded or quantized one would silently lose
    what it was chosen for."""
    if cache is None:
        return
    if isinstance(cache, PivotKVCache):
        raise ValueError("apply_retake: the ReTaKe prefill makes its own PivotKVCache from the handle's "
                         "RetakeConfig; pass no cache (generate() makes an empty one, which is fine)")
    offloading = getattr(cache, "offloading", False)
    if type(cache) is not DynamicCache or offloading:
        kind = type(cache).__name__ + (" with offloading" if offloading else "")
        raise ValueError(f"apply_retake: got a {kind} for a prompt with videos; the ReTaKe prefill returns its own "
                         "PivotKVCache, which drops evicted video tokens, in its place. Pass no cache and no "
                         "cache_implementation (generate() then makes a plain DynamicCache, which is fine)")


def check_prefill_call(model, named: dict, cache) -> None:
    """ValueError, before any work, for a forward call with videos that the ReTaKe prefill cannot serve."""
    if model.dtype not in FLOAT_DTYPES:  # checked per call: the model may have moved since it was patched
        raise ValueError(f"apply_retake: the ReTaKe prefill runs in float16, bfloat16 or float32, got a "
                         f"{str(model.dtype).removeprefix('torch.')} model")
    if named.get("use_cache") is False:
        raise ValueError(_NO_CACHE)
    check_cache(cache)
    mask = named.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        got = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"apply_retake: the ReTaKe prefill takes the processor's 2-D attention_mask [batch, "
                         f"length], got {got}")


def _generation_options(model, signature: inspect.Signature, named: dict):
    """(the generation config generate() will use, generate()'s keyword-only extras by name)."""
    extra = {name: value for name, value in named.items() if name not in signature.parameters}
    return _compat.generation_config(model, named.get("generation_config"), extra), extra


def check_memory_generate_options(model, signature: inspect.Signature, named: dict) -> None:
    """ValueError for generation options that cannot continue on a VideoMemory."""
    config = _generation_options(model, signature, named)[0]
    if config.use_cache is False:
        raise ValueError("apply_retake: use_cache=False with a VideoMemory: the memory is the cache the answer "
                         "continues on; drop use_cache=False")
    if _compat.is_assisted(config, named.get("assistant_model")):
        raise ValueError("apply_retake: assisted generation (assistant_model, prompt_lookup_num_tokens, "
                         "assistant_early_exit) with a VideoMemory: on a PivotKVCache its answers are not those of "
                         "plain decoding; drop the assistant")
    for name in ("num_beams", "num_return_sequences"):
        if (getattr(config, name, None) or 1) > 1:
            raise ValueError(f"apply_retake: {name}={getattr(config, name)} with a VideoMemory: generate() does not "
                             "expand a cache it is given; repeat the question instead "
                             "(memory.question_inputs([question] * n)) and sample")


def check_generate_options(model, signature: inspect.Signature, named: dict) -> None:
    """ValueError, before generate() does any work, for generation options that the ReTaKe prefill cannot
    serve on a prompt with videos. named: generate()'s arguments by name (_named); its keyword-only extras
    are merged with the passed and the model's generation_config as generate() merges them."""
    config, extra = _generation_options(model, signature, named)
    if config.use_cache is False:
        raise ValueError(_NO_CACHE)
    if config.cache_implementation not in _CACHE_IMPLEMENTATIONS:
        raise ValueError(f"apply_retake: cache_implementation={config.cache_implementation!r} with videos: the ReTaKe "
                         "prefill returns its own PivotKVCache, which drops evicted video tokens, and decoding "
                         "continues on it; drop cache_implementation (or pass 'dynamic')")
    if config.prefill_chunk_size is not None:
        raise ValueError(f"apply_retake: prefill_chunk_size={config.prefill_chunk_size!r} with videos: generate() "
                         "would split the prompt, videos included, into token chunks, while the ReTaKe prefill "
                         "already chunks the video by frames; drop prefill_chunk_size and bound the prefill's "
                         "memory with RetakeConfig(chunk_frames=...)")
    if _compat.is_assisted(config, named.get("assistant_model")):
        raise ValueError("apply_retake: assisted generation (assistant_model, prompt_lookup_num_tokens, "
                         "assistant_early_exit) with videos: its first forward feeds the candidate tokens with the "
                         "prompt, which the ReTaKe prefill would take for part of the question it scores the video "
                         "with; drop the assistant")
    cache = _compat.cache_from_kwargs(extra)
    if cache is not None and cache.get_seq_length() == 0:
        check_cache(cache)


def _apply(family_name: str, model, config, overrides) -> RetakeHandle:
    family = FAMILIES[family_name]
    config = _config(config, overrides)
    if model is None:
        handle = RetakeHandle(family, config, family.model_class(), instance=False)
    else:
        model_type = getattr(model.config, "model_type", None)
        if model_type not in family.model_types:
            raise ValueError(f"apply_retake_to_{family_name}: model {type(model).__name__} has model_type "
                             f"{model_type!r}, expected one of {list(family.model_types)}")
        check_model(model, family, config)
        handle = RetakeHandle(family, config, model, instance=True)
    handle._install()
    return handle


def apply_retake_to_qwen2_vl(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen2-VL: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("qwen2_vl", model, config, overrides)


def apply_retake_to_qwen2_5_vl(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen2.5-VL: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("qwen2_5_vl", model, config, overrides)


def apply_retake_to_qwen3_vl(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen3-VL: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("qwen3_vl", model, config, overrides)


def apply_retake_to_qwen3_vl_moe(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen3-VL-MoE: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("qwen3_vl_moe", model, config, overrides)


def apply_retake_to_qwen3_5(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen3.5 (hybrid: PivotKV in its full-attention layers): patch `model`, or with model=None the
    class (every model, also later ones)."""
    return _apply("qwen3_5", model, config, overrides)


def apply_retake_to_qwen3_5_moe(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for Qwen3.5-MoE (hybrid: PivotKV in its full-attention layers): patch `model`, or with model=None the
    class (every model, also later ones)."""
    return _apply("qwen3_5_moe", model, config, overrides)


def apply_retake_to_glm4v(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for GLM-4.1V: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("glm4v", model, config, overrides)


def apply_retake_to_glm4v_moe(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for GLM-4.5V: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("glm4v_moe", model, config, overrides)


def apply_retake_to_glm46v(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for GLM-4.6V: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("glm46v", model, config, overrides)


def apply_retake_to_internvl(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for InternVL (InternVL3, InternVL3.5): patch `model`, or with model=None the class (every model,
    also later ones)."""
    return _apply("internvl", model, config, overrides)


def apply_retake_to_llava_onevision(model=None, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe for LLaVA-OneVision: patch `model`, or with model=None the class (every model, also later ones)."""
    return _apply("llava_onevision", model, config, overrides)


MODEL_TYPE_TO_APPLY_FN = {
    "qwen2_vl": apply_retake_to_qwen2_vl,
    "qwen2_5_vl": apply_retake_to_qwen2_5_vl,
    "qwen3_vl": apply_retake_to_qwen3_vl,
    "qwen3_vl_moe": apply_retake_to_qwen3_vl_moe,
    "qwen3_5": apply_retake_to_qwen3_5,
    "qwen3_5_moe": apply_retake_to_qwen3_5_moe,
    "glm4v": apply_retake_to_glm4v,
    "glm4v_moe": apply_retake_to_glm4v_moe,
    "glm46v": apply_retake_to_glm46v,
    "internvl": apply_retake_to_internvl,
    "llava_onevision": apply_retake_to_llava_onevision,
}


def apply_retake(model, config: RetakeConfig | None = None, **overrides) -> RetakeHandle:
    """ReTaKe (DPSelect + PivotKV + chunked prefill) on a VideoLLM instance, in one line.

        handle = apply_retake(model, RetakeConfig(frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=32))
        out = model.generate(**inputs, max_new_tokens=64)   # inputs: the model's processor outputs
        handle.remove()                                      # or: with apply_retake(model, ...):

    overrides: RetakeConfig fields replacing those of `config`. Raises ValueError for a model type
    without a ReTaKe adapter (naming it and the supported ones) and for a model the prefill cannot
    run exactly (attention other than eager/sdpa, sliding-window layers).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    apply = MODEL_TYPE_TO_APPLY_FN.get(model_type)
    if apply is None:
        raise ValueError(f"apply_retake: model {type(model).__name__} has model_type {model_type!r}; ReTaKe supports "
                         f"{sorted(MODEL_TYPE_TO_APPLY_FN)}")
    return apply(model, config, **overrides)
