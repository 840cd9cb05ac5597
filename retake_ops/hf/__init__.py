"""Hugging Face transformers integration: PivotKV for any decoder, ReTaKe for VideoLLMs in one line.

    handle = apply_retake(model, RetakeConfig(frame_keep_ratio=0.5, kv_keep_ratio=0.25))
    model.generate(**processor_outputs, max_new_tokens=64)

or, for any decoder, a PivotKVCache filled by chunked_prefill. Needs transformers >= 5.17
(install the `hf` extra: pip install 'retake-ops[hf]'). Inference only.
"""
try:
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError("retake_ops.hf needs transformers >= 5.17, which is not installed: "
                      "pip install 'retake-ops[hf]'") from err

from . import _compat

_compat.check_version()

from ._compat import cache_arg  # noqa: E402
from .attention import AttentionSwitch, disable_pivotkv_attention, enable_pivotkv_attention  # noqa: E402
from .cache import PivotKVCache, PivotKVLayer  # noqa: E402
from .prefill import chunked_prefill  # noqa: E402
from .retake import (MODEL_TYPE_TO_APPLY_FN, RetakeConfig, RetakeHandle, apply_retake,  # noqa: E402
                     apply_retake_to_glm4v, apply_retake_to_glm4v_moe, apply_retake_to_glm46v,
                     apply_retake_to_internvl, apply_retake_to_llava_onevision, apply_retake_to_qwen2_5_vl,
                     apply_retake_to_qwen2_vl, apply_retake_to_qwen3_5, apply_retake_to_qwen3_5_moe,
                     apply_retake_to_qwen3_vl, apply_retake_to_qwen3_vl_moe)
from .videollm import RetakeReport, VideoReport  # noqa: E402
from .memory import VideoMemory, load_memory  # noqa: E402

__all__ = ["apply_retake", "RetakeConfig", "RetakeHandle", "RetakeReport", "VideoReport", "MODEL_TYPE_TO_APPLY_FN",
           "apply_retake_to_qwen2_vl", "apply_retake_to_qwen2_5_vl", "apply_retake_to_qwen3_vl",
           "apply_retake_to_qwen3_vl_moe", "apply_retake_to_qwen3_5", "apply_retake_to_qwen3_5_moe",
           "apply_retake_to_glm4v", "apply_retake_to_glm4v_moe", "apply_retake_to_glm46v", "apply_retake_to_internvl",
           "apply_retake_to_llava_onevision", "PivotKVCache", "PivotKVLayer", "chunked_prefill", "cache_arg",
           "enable_pivotkv_attention", "disable_pivotkv_attention", "AttentionSwitch", "VideoMemory", "load_memory"]
