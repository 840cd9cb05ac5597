"""Every touch point with transformers, in one module.

Supported: transformers MIN_VERSION and newer; tested from MIN_VERSION up to TESTED_MAX (the
version CI pins). Between those releases transformers renamed the decoder's cache argument
(`past_key_values` -> `cache`, and the matching output field), started passing the
attention kwargs to `Cache.update`, and moved a tensor-parallel model's device mesh (one mesh on
the model, then a manager of several); the rest of `retake_ops.hf` asks this module instead of
assuming either. Importing a transformers newer than TESTED_MAX warns once.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
import transformers
from packaging.version import Version
from transformers import AttentionInterface
from transformers.generation.configuration_utils import GenerationMode
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

MIN_VERSION = "5.17.0"
TESTED_MAX = "5.24.0"
WRAPPABLE = ("eager", "sdpa")


def check_version(version: str = transformers.__version__) -> None:
    """ImportError below MIN_VERSION; one UserWarning for a minor release newer than TESTED_MAX."""
    found = Version(version)
    if found < Version(MIN_VERSION):
        raise ImportError(f"retake_ops.hf needs transformers >= {MIN_VERSION}, found {version}: "
                          f"pip install 'retake-ops[hf]' (or 'transformers>={MIN_VERSION}')")
    if found.release[:2] > Version(TESTED_MAX).release[:2]:
        warnings.warn(f"retake_ops.hf was tested with transformers {MIN_VERSION} to {TESTED_MAX}; found {version}. "
                      "It may work; if a result looks wrong, pin transformers to the tested range.",
                      UserWarning, stacklevel=3)


def cache_kwarg(fn) -> str:
    """The name under which a model's forward (or generate) takes its KV cache."""
    return "cache" if "cache" in inspect.signature(fn).parameters else "past_key_values"


def cache_from_kwargs(kwargs: dict):
    """The cache in a forward's keyword arguments, whichever name carries it."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def cache_arg(model, cache) -> dict:
    """{name: cache} for `model.generate(..., **cache_arg(model, cache))` and plain forward calls: the
    argument name the installed transformers expects (`cache` from 5.24 on, `past_key_values` before)."""
    return {cache_kwarg(model.forward): cache}


def pre_encodes_vision(forward) -> bool:
    """Whether generate() runs a model's vision tower itself before the prefill (5.24 on: its forward
    takes mm_encoder_outputs) instead of passing pixel values to the forward."""
    return "mm_encoder_outputs" in inspect.signature(forward).parameters


def generation_config(model, passed, kwargs: dict):
    """The GenerationConfig a generate(generation_config=passed, **kwargs) call runs with: the passed
    config (or the model's), the model's values where it leaves them unset, then the kwargs."""
    return model._prepare_generation_config(passed, **kwargs)[0]


def is_assisted(config, assistant_model) -> bool:
    """Whether generate() runs assisted decoding (an assistant model, prompt lookup or early exit)."""
    return config.get_generation_mode(assistant_model) == GenerationMode.ASSISTED_GENERATION


# GenerationMixin's hook that repeats every input for beams and several returned sequences.
EXPAND_HOOK = "_expand_inputs_for_generation"


def expands_videos(cls) -> bool:
    """Whether a model class repeats its video inputs per video for beams itself, with its own EXPAND_HOOK
    (5.17's Qwen and GLM classes); the generic one repeats every tensor row by row."""
    from transformers import GenerationMixin

    return getattr(cls, EXPAND_HOOK) is not getattr(GenerationMixin, EXPAND_HOOK)


def generate_positions(mask: torch.Tensor) -> torch.Tensor:
    """The 1-D positions generate() gives a left-padded batch: the attention mask's cumsum - 1
    (padding at 1)."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def rope_index(model, ids: torch.Tensor, mask: torch.Tensor, video: torch.Tensor, extra: dict):
    """(positions int64 [3, B, L], rope_deltas [B, 1]) of a Qwen-family (or GLM-4.1V) VideoLLM from its
    own get_rope_index, for inputs whose only vision tokens are videos (video: bool [B, L], where they are)."""
    types = video.int() * 2
    return model.model.get_rope_index(ids, mm_token_type_ids=types, attention_mask=mask, **extra)


def set_rope_deltas(model, deltas: torch.Tensor) -> None:
    """Set the per-row offset a Qwen-family VideoLLM adds to the positions it derives for later calls
    (tokens counted by the attention mask, or by the cache without one)."""
    model.model.rope_deltas = deltas


def patched_forward_signature(forward) -> inspect.Signature:
    """The signature a patched VideoLLM forward shows: the original's without `mm_encoder_outputs`,
    so that generate() (5.24 and newer) hands it raw pixel_values_videos and video_grid_thw instead of
    running the vision tower itself and dropping the grid."""
    signature = inspect.signature(forward)
    return signature.replace(parameters=[p for name, p in signature.parameters.items()
                                         if name != "mm_encoder_outputs"])


def per_video(features, sizes: list[int]) -> list[torch.Tensor]:
    """A vision tower's per-token output as one tensor per video: 5.24 splits it, 5.17 (Qwen3-VL's
    deepstack features) returns it whole."""
    return list(torch.split(features, sizes)) if isinstance(features, torch.Tensor) else list(features)


def decoder(model):
    """The module that runs the decoder layers (it owns rotary_emb and the layers)."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def decoder_config(model):
    """The config whose _attn_implementation the decoder's attention layers read."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def attention_implementation(model) -> str:
    return decoder_config(model)._attn_implementation


def set_attention_implementation(model, name: str) -> None:
    """Switch the decoder's attention (not a vision tower's) with the public set_attn_implementation."""
    if decoder_config(model) is model.config:
        model.set_attn_implementation(name)
        return
    key = next(k for k in model.config.sub_configs if getattr(model.config, k) is decoder_config(model))
    model.set_attn_implementation({key: name})


def register_attention(name: str, fn, mask_of: str) -> None:
    """Register an attention function, with the mask builder of the implementation it wraps."""
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_of])


def base_attention(name: str, module):
    """The model's own "sdpa" or "eager" attention function for an attention module."""
    if name == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"PivotKV: {type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            "expected a model whose eager attention is that module-level function, or load it with "
            "attn_implementation='sdpa'")
    return fn


def rope_functions(rotary):
    """(rotate_half, apply_rotary_pos_emb) of the modeling module that defines a rotary embedding."""
    module = sys.modules.get(type(rotary).__module__)
    return getattr(module, "rotate_half", None), getattr(module, "apply_rotary_pos_emb", None)


def rope_cos_sin(rotary, positions: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos, sin [B, L, rot_dim] on `device` of a decoder's rotary embedding at int64 positions: [B, L]
    (1-D RoPE) or [3, B, L] (multimodal RoPE, whose rotary module merges the sections itself). Under a
    device_map the rotary module may run on another device than the layer asking (its hook moves the
    inputs there), so the result is brought back."""
    probe = torch.empty(0, dtype=torch.float32, device=device)
    cos, sin = rotary(probe, positions.to(device))
    return cos.to(device, torch.float32), sin.to(device, torch.float32)


def is_mrope(model) -> bool:
    """Whether the decoder uses multimodal (3-D) RoPE positions."""
    config = decoder_config(model)
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return "mrope_section" in params or getattr(getattr(decoder(model), "rotary_emb", None), "mrope_section",
                                                 None) is not None


def mrope_rows(position_ids: torch.Tensor) -> slice:
    """The rows of a position_ids tensor that carry RoPE positions: [4, B, L] (a text row for the
    mask builder, then the three multimodal rows) -> rows 1..3; [3, B, L] and [B, L] -> all."""
    return slice(1, None) if position_ids.dim() == 3 and position_ids.shape[0] == 4 else slice(None)


def tensor_parallel_mesh(model):
    """The 1-D device mesh over which a model loaded with tensor parallelism
    (`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))` under torchrun) shards
    its attention heads; None for a model that is not tensor parallel. 5.24 keeps the meshes in a
    manager (`get_mesh("tp")`); 5.17 keeps one mesh, 1-D or with a "tp" dimension."""
    if (getattr(model, "tp_size", None) or 1) <= 1:
        return None
    manager = getattr(model, "_mesh_manager", None)
    if manager is not None:
        return manager.get_mesh("tp")
    mesh = model._device_mesh
    return mesh["tp"] if mesh.ndim > 1 else mesh


def query_heads(model) -> int | None:
    """Query heads of the decoder's attention layers (all ranks together); None where the config
    gives no single count."""
    heads = getattr(decoder_config(model), "num_attention_heads", None)
    return heads if isinstance(heads, int) else None


# Hybrid decoders (Qwen3.5): linear-attention layers keep a recurrent state and a convolution window in
# transformers' LinearAttentionLayer (the same from 5.17 on), one state of each per layer.
def linear_attention_indices(config) -> list[int]:
    """The decoder layers a config marks "linear_attention" (none for a model without layer_types)."""
    return [i for i, kind in enumerate(getattr(config, "layer_types", None) or []) if kind == "linear_attention"]


def linear_attention_modules(model) -> list:
    """The linear-attention modules of a hybrid decoder's layers (each layer's `linear_attn`)."""
    layers = decoder(model).layers
    return [layers[i].linear_attn for i in linear_attention_indices(decoder_config(model))]


def linear_attention_cache_layer():
    from transformers.cache_utils import LinearAttentionLayer

    return LinearAttentionLayer()


def linear_cache(kwargs: dict):
    """The cache a linear-attention module was called with (5.24: `cache`, 5.17: `cache_params`)."""
    return kwargs.get("cache", kwargs.get("cache_params"))


def linear_started(layer) -> bool:
    """Whether a linear-attention cache layer holds a state (it has seen tokens)."""
    return any(layer.has_previous_state.values())


def linear_states(layer) -> list[torch.Tensor]:
    """A linear-attention cache layer's state tensors (convolution windows, recurrent states), batch first;
    the layer updates them in place."""
    return [t for states in (layer.conv_states, layer.recurrent_states) for t in states.values() if t is not None]


def linear_repeat(layer, times: int) -> None:
    """Each row of a linear-attention cache layer's states `times` times in a row (the layer has no batch
    operations of its own in every supported transformers)."""
    for states in (layer.conv_states, layer.recurrent_states):
        for key, t in states.items():
            if t is not None:
                states[key] = t.repeat_interleave(times, 0)


class linear_row:
    """Within the block, a linear-attention cache layer is row `row` of itself: its states are views of
    that row, which the layer's in-place updates write through."""

    def __init__(self, layer, row: int):
        self.layer, self.row = layer, row

    def __enter__(self):
        layer, row = self.layer, self.row
        self.saved = (dict(layer.conv_states), dict(layer.recurrent_states))
        for states in (layer.conv_states, layer.recurrent_states):
            for key, t in states.items():
                if t is not None:
                    states[key] = t[row:row + 1]
        return layer

    def __exit__(self, *exc):
        self.layer.conv_states, self.layer.recurrent_states = self.saved
