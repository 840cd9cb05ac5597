"""Position re-forging for PivotKVCache (ReTaKe's `pos_embed_reforge`), opt-in.

After a prefill chunk is evicted, the kept keys are rotated from the RoPE positions they
were computed at to compressed ones (the rules are in PivotKVCache's docstring). Rotation uses
the model's own rotary embedding module (cos/sin for given positions, so any rope_type and
multimodal RoPE, whose module merges its sections itself) and the `rotate_half` of its
modeling module:

    rotated  = x * cos + rotate_half(x) * sin            (first cos.shape[-1] dims)
    x        = (rotated * cos - rotate_half(rotated) * sin) / (cos^2 + sin^2)

The second line is the exact inverse of the first for any attention_scaling folded into
cos/sin, because both halves of a rotated pair share one angle. That the model's RoPE has
this form is checked once per model against its `apply_rotary_pos_emb`.
"""
from __future__ import annotations

import torch

from . import _compat


class Rope:
    """The model's rotary embedding: cos/sin at given positions, its rotate_half, its position rank."""

    def __init__(self, rotary, rotate_half, head_dim: int, components: int):
        self.rotary = rotary
        self.rotate_half = rotate_half
        self.head_dim = head_dim
        self.components = components  # 1: positions [B, L]; 3: multimodal positions [3, B, L]

    def cos_sin(self, ref: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [B, L, rot_dim] at int64 positions [B, L, P]; ref gives the device."""
        pos = positions[..., 0] if self.components == 1 else positions.permute(2, 0, 1)
        return _compat.rope_cos_sin(self.rotary, pos, ref.device)

    def rerotate(self, keys: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """keys [B, H, L, D] rotated at positions old [B, L, P], rotated instead at new (computed in fp32)."""
        cos_o, sin_o = (t[:, None] for t in self.cos_sin(keys, old))
        cos_n, sin_n = (t[:, None] for t in self.cos_sin(keys, new))
        rot = cos_o.shape[-1]
        k = keys.float()
        k_rot, k_pass = k[..., :rot], k[..., rot:]
        raw = (k_rot * cos_o - self.rotate_half(k_rot) * sin_o) / (cos_o * cos_o + sin_o * sin_o)
        out = raw * cos_n + self.rotate_half(raw) * sin_n
        return torch.cat([out, k_pass], dim=-1).to(keys.dtype)


def model_rope(model) -> Rope:
    """The Rope of a model's decoder, checked against its apply_rotary_pos_emb; ValueError when unusable."""
    decoder = _compat.decoder(model)
    name = type(model).__name__
    rotary = getattr(decoder, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name} has no rotary_emb module on its "
                         f"decoder {type(decoder).__name__}; re-forging needs a RoPE decoder that computes cos/sin "
                         "once per forward from position_ids")
    rotate_half, apply = _compat.rope_functions(rotary)
    if rotate_half is None or apply is None:
        raise ValueError(f"PivotKVCache(reforge_positions=True): model {name} has no rotate_half / "
                         f"apply_rotary_pos_emb in {type(rotary).__module__}; re-forging needs RoPE of the form "
                         "x * cos + rotate_half(x) * sin")
    config = _compat.decoder_config(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = Rope(rotary, rotate_half, head_dim, 3 if _compat.is_mrope(model) else 1)
    _check_rope(rope, apply, name)
    return rope


def _check_rope(rope: Rope, apply, name: str) -> None:
    """The inverse rotation must reproduce the model's own RoPE at other positions (fp32)."""
    param = next(rope.rotary.buffers(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, 1, 4, rope.head_dim, generator=torch.Generator().manual_seed(0)).to(device)
    a = torch.tensor([[0, 7, 130, 3]], device=device)[..., None] + torch.arange(rope.components, device=device)
    b = torch.tensor([[5, 2, 61, 3]], device=device)[..., None] * (1 + torch.arange(rope.components, device=device))
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
