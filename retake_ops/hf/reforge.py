"""Position re-forging for PivotKVCache (ReTaKe's `pos_embed_reforge`), opt-in.

After a prefill chunk is evicted, the kept keys are un-rotated from the RoPE positions
they were computed at and re-rotated at compressed positions; every later token is
shifted down by the positions the evicted chunks gave up. Rotation uses the model's own
rotary embedding module (cos/sin for given position_ids, so any 1-D rope_type works)
and the `rotate_half` of its modeling module:

    rotated  = x * cos + rotate_half(x) * sin            (first cos.shape[-1] dims)
    x        = (rotated * cos - rotate_half(rotated) * sin) / (cos^2 + sin^2)

The second line is the exact inverse of the first for any attention_scaling folded into
cos/sin, because both halves of a rotated pair share one angle. That the model's RoPE
has this form is checked once per model against its `apply_rotary_pos_emb`.

Positions (per batch row, layer-independent, decided by the masks alone): a chunk whose
row keeps k of its n evictable real tokens gives up n - k positions. A real token of the
chunk with e evictable real tokens before it (in that chunk) moves from its position p
to p - (e - floor(e * k / n)): the chunk's evictable run is scaled by k / n from its own
start, a protected token moves with the run before it, and the chunk ends n - k positions
earlier. Tokens after the chunk, including those of later generate() / model() calls,
run at their usual position minus the accumulated shift. Padding never moves or counts.
"""
from __future__ import annotations

import sys

import torch

ATTR = "_retake_reforge"


class Rope:
    """The model's rotary embedding: cos/sin at given positions, and its rotate_half."""

    def __init__(self, rotary, rotate_half, head_dim: int):
        self.rotary = rotary
        self.rotate_half = rotate_half
        self.head_dim = head_dim

    def cos_sin(self, ref: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [B, L, rot_dim] for int64 positions [B, L]; ref gives the device."""
        probe = torch.empty(0, dtype=torch.float32, device=ref.device)
        cos, sin = self.rotary(probe, positions.to(ref.device))
        return cos.float(), sin.float()

    def rerotate(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """keys [B, H, L, D] rotated at positions old [B, L], rotated instead at new [B, L] (computed in fp32)."""
        cos_o, sin_o = (t[:, None] for t in self.cos_sin(keys, old))
        cos_n, sin_n = (t[:, None] for t in self.cos_sin(keys, new))
        rot = cos_o.shape[-1]
        k = keys.float()
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        raw = (k_rot * cos_o - self.rotate_half(k_rot) * sin_o) / (cos_o * cos_o + sin_o * sin_o)
        out = raw * cos_n + self.rotate_half(raw) * sin_n
        return torch.cat([out, k_pass], dim=-1).to(keys.dtype)


def _decoder_config(decoder):
    config = decoder.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_rope(model) -> Rope:
    """The Rope of a model's decoder, checked against its apply_rotary_pos_emb; ValueError when unusable."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    rope = getattr(decoder, ATTR, None)
    if rope is not None:
        return rope
    name = type(model).__name__
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name} has no rotary_emb module on its "
                         f"decoder {type(decoder).__name__}; re-forging needs a RoPE decoder that computes cos/sin "
                         "once per forward from position_ids")
    config = _decoder_config(decoder)
    rope_params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if getattr(rotary, "mrope_section", None) is not None or "mrope_section" in rope_params:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name} uses multimodal RoPE (mrope_section); "
                         "re-forging supports 1-D positions only, use reforge_positions=False")
    module = sys.modules.get(type(rotary).__module__)
    rotate_half = getattr(module, "rotate_half", None)
    apply = getattr(module, "apply_rotary_pos_emb", None)
    if rotate_half is None or apply is None:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name} has no rotate_half / "
                         f"apply_rotary_pos_emb in {type(rotary).__module__}; re-forging needs RoPE of the form "
                         "x * cos + rotate_half(x) * sin")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = Rope(rotary, rotate_half, head_dim)
    _check_rope(rope, apply, name)
    return rope


def _check_rope(rope: Rope, apply, name: str) -> None:
    """The inverse rotation must reproduce the model's own RoPE at other positions (fp32)."""
    param = next(rope.rotary.buffers(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, 1, 4, rope.head_dim, generator=torch.Generator().manual_seed(0)).to(device)
    a = torch.tensor([[0, 7, 130, 3]], device=device)
    b = torch.tensor([[5, 2, 61, 3]], device=device)
    try:
        rot_a = apply(x, x, *rope.cos_sin(x, a))[1]
        rot_b = apply(x, x, *rope.cos_sin(x, b))[1]
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name}'s apply_rotary_pos_emb(q, k, cos, sin) "
                         f"failed on a probe ({err}); re-forging needs RoPE of the form x * cos + "
                         "rotate_half(x) * sin") from err
    if not torch.allclose(rope.rerotate(rot_a, a, b), rot_b, rtol=1e-4, atol=1e-5):
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name}'s RoPE is not x * cos + "
                         "rotate_half(x) * sin over the first cos.shape[-1] dims; re-forging cannot invert it")


def _positions_hook(module, args, kwargs):
    """Shift the decoder's position_ids by what a re-forging PivotKVCache gave up (before RoPE)."""
    from .cache import PivotKVCache

    cache = kwargs.get("past_key_values")
    if not isinstance(cache, PivotKVCache) or not cache.reforge_positions:
        return None
    positions = kwargs.get("position_ids")
    if positions is None:
        tokens = kwargs.get("inputs_embeds")
        if tokens is None:
            tokens = kwargs["input_ids"] if kwargs.get("input_ids") is not None else args[0]
        # As the decoder itself does: the new tokens follow the cache's original length.
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None] + cache.get_seq_length()
    elif positions.dim() != 2:
        raise ValueError(f"PivotKVCache(reforge_positions=True): position_ids must be [B, L] (1-D positions), "
                         f"got shape {list(positions.shape)}")
    shift = cache.position_shift()
    if shift is not None:
        positions = positions - shift.to(positions.device)[:, None]
    cache.step_positions = positions
    kwargs["position_ids"] = positions
    return args, kwargs


def _clear_hook(module, args, kwargs, output):
    cache = kwargs.get("past_key_values")
    if hasattr(cache, "step_positions"):
        cache.step_positions = None


def enable_reforge(model) -> Rope:
    """Install the position hook on the model's decoder (idempotent) and return its Rope."""
    rope = model_rope(model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if getattr(decoder, ATTR, None) is None:
        decoder.register_forward_pre_hook(_positions_hook, with_kwargs=True)
        decoder.register_forward_hook(_clear_hook, with_kwargs=True)
        setattr(decoder, ATTR, rope)
    return rope
