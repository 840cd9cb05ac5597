"""One adapter per VideoLLM family: its video token layout, features and positions."""
from .base import Frame, Video, VideoFamily
from .glm4v import Glm4vFamily, Glm46VFamily, Glm4vMoeFamily
from .internvl import InternVLFamily
from .llava_onevision import LlavaOnevisionFamily
from .qwen2_5_vl import Qwen2_5_VLFamily
from .qwen2_vl import Qwen2VLFamily
from .qwen3_5 import Qwen3_5Family, Qwen3_5MoeFamily
from .qwen3_vl import Qwen3VLFamily
from .qwen3_vl_moe import Qwen3VLMoeFamily

FAMILIES = {family.name: family for family in (Qwen2VLFamily(), Qwen2_5_VLFamily(), Qwen3VLFamily(),
                                              Qwen3VLMoeFamily(), Qwen3_5Family(),
                                              Qwen3_5MoeFamily(), Glm4vFamily(), Glm4vMoeFamily(), Glm46VFamily(),
                                              InternVLFamily(), LlavaOnevisionFamily())}

__all__ = ["FAMILIES", "Frame", "Video", "VideoFamily"]
