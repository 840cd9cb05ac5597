"""Question-aware frame selection in front of any VideoLLM (arXiv 2502.19680, selection stage).

A scorer gives every candidate frame a relevance score for the question, and
greedy NMS (retake_ops.nms_select) picks k frames that are relevant and spread
out in time. The picked frames go to an unchanged VideoLLM processor.

Scorer interface: ``scores = scorer(frames_or_features, question)`` with
  frames_or_features: pixels [B, N, H, W, C] (channels last, as the video's dtype,
                      usually uint8) or precomputed features [B, N, D];
  question:           one str for every row, or a sequence of B str;
  scores:             real [B, N] (floating point or integer), higher = more relevant.
Any callable with that signature works (e.g. a trained selector model); this module
ships the uniform baseline (UniformScorer) and CLIP/SigLIP similarity (SimilarityScorer).
"""
from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import FLOAT_DTYPES, check_int, shape_str
from .ops.nms_select import nms_select

Scorer = Callable[[Tensor, "str | Sequence[str]"], Tensor]
CHANNELS = (1, 3)  # grey or RGB


def uniform_indices(T: int, k: int) -> Tensor:
    """k evenly spaced frames out of T, int64 [k] ascending: the centres of k equal
    segments, ((2i + 1) * T) // (2k). Distinct for 0 <= k <= T; k = T gives every frame."""
    T, k = check_int("uniform_indices", "T", T), check_int("uniform_indices", "k", k)
    if T < 0 or not 0 <= k <= T:
        raise ValueError(f"uniform_indices: need 0 <= k <= T, got T={T}, k={k}")
    return (2 * torch.arange(k, dtype=torch.int64) + 1) * T // (2 * k) if k else torch.empty(0, dtype=torch.int64)


def _questions(question, B: int, who: str) -> list[str]:
    if isinstance(question, str):
        return [question] * B
    questions = list(question)
    if len(questions) != B or not all(isinstance(q, str) for q in questions):
        raise ValueError(f"{who}: question must be a str or a sequence of B={B} str, got {question!r}")
    return questions


class UniformScorer:
    """The uniform baseline: every frame is equally relevant (constant scores [B, N]).

    select_frames does not run NMS for this scorer but returns evenly spaced frames
    (uniform_indices), the usual default of VideoLLMs. Through NMS, constant scores
    would pick from the start of the video: the tie rule prefers lower indices.
    """

    def __call__(self, frames_or_features: Tensor, question) -> Tensor:
        B, N = frames_or_features.shape[:2]
        _questions(question, B, "UniformScorer")
        return torch.zeros(B, N, device=frames_or_features.device)


def _features(out) -> Tensor:
    # get_*_features returns the projected embeddings as a tensor in older transformers,
    # and as the pooler_output of a model output in newer ones.
    return out if isinstance(out, Tensor) else out.pooler_output


class SimilarityScorer:
    """Cosine similarity between each frame's image embedding and the question's text
    embedding, from a Hugging Face CLIP or SigLIP model (anything with
    get_image_features / get_text_features) and its processor (images=..., text=...).

    frames_or_features: uint8 pixels [B, N, H, W, C] (embedded batch_size frames at a
    time) or image embeddings [B, N, D] (used as they are). Returns fp32 [B, N] in [-1, 1].
    text_kwargs go to the processor with the question; the default pads to the longest
    question, or to max_length for SigLIP models, which were trained that way.
    """

    def __init__(self, model, processor, *, batch_size: int = 64, text_kwargs: dict | None = None):
        self.batch_size = check_int("SimilarityScorer", "batch_size", batch_size, minimum=1)
        self.model = model.eval()
        self.processor = processor
        if text_kwargs is None:
            config = model.config
            if config.model_type.startswith("siglip"):
                text_kwargs = {"padding": "max_length", "max_length": config.text_config.max_position_embeddings}
            else:
                text_kwargs = {"padding": True}
            text_kwargs["truncation"] = True
        self.text_kwargs = text_kwargs

    def _to_model(self, inputs) -> dict:
        param = next(self.model.parameters())
        return {name: t.to(param.device, param.dtype if t.is_floating_point() else t.dtype)
                for name, t in inputs.items()}

    @torch.inference_mode()
    def text_embeddings(self, questions: list[str]) -> Tensor:
        """[len(questions), D] text embeddings."""
        inputs = self.processor(text=questions, return_tensors="pt", **self.text_kwargs)
        return _features(self.model.get_text_features(**self._to_model(inputs)))

    @torch.inference_mode()
    def image_embeddings(self, frames: Tensor) -> Tensor:
        """[M, D] image embeddings of M frames given as pixels [M, H, W, C]."""
        chunks = []
        for start in range(0, frames.shape[0], self.batch_size):
            images = [f.numpy() for f in frames[start:start + self.batch_size].cpu()]
            inputs = self.processor(images=images, return_tensors="pt", input_data_format="channels_last")
            chunks.append(_features(self.model.get_image_features(**self._to_model(inputs))))
        return torch.cat(chunks)

    def __call__(self, frames_or_features: Tensor, question) -> Tensor:
        x = frames_or_features
        if x.dim() == 5:
            B, N = x.shape[:2]
            img = self.image_embeddings(x.reshape(B * N, *x.shape[2:])).reshape(B, N, -1)
        elif x.dim() == 3 and x.is_floating_point():
            B, N = x.shape[:2]
            img = x
        else:
            raise ValueError("SimilarityScorer: frames_or_features must be pixels [B, N, H, W, C] or float "
                             f"features [B, N, D], got {x.dtype} {shape_str(x)}")
        if N == 0:
            return torch.zeros(B, 0)
        txt = self.text_embeddings(_questions(question, B, "SimilarityScorer"))
        txt = txt.to(img.device)
        return F.cosine_similarity(img.float(), txt.float()[:, None, :], dim=-1)


class FrameSelection(NamedTuple):
    """What select_frames returns. indices: int64 [k] ascending frame numbers in the video;
    frames: video[indices], [k, ...] in the video's own layout; candidates: int64 [N] the
    frames that were scored; scores: [N] their scores as the scorer returned them (its dtype;
    fp32 zeros for the uniform baseline)."""
    indices: Tensor
    frames: Tensor
    candidates: Tensor
    scores: Tensor


def _channels_last(video: Tensor, layout: str | None) -> bool:
    if layout is not None:
        if layout not in ("THWC", "TCHW"):
            raise ValueError(f"select_frames: layout must be 'THWC', 'TCHW' or None, got {layout!r}")
        return layout == "THWC"
    last, second = video.shape[-1] in CHANNELS, video.shape[1] in CHANNELS
    if last != second:
        return last
    raise ValueError(f"select_frames: cannot tell the channel dimension of video {shape_str(video)}: pass "
                     "layout='THWC' or layout='TCHW'")


# fp32 holds every integer up to 2^24 exactly: the largest rank ranking_scores may produce.
MAX_RANKED = 1 << 24


def ranking_scores(scores: Tensor) -> Tensor:
    """Scores that nms_select ranks exactly as `scores`, never rounded: fp16/bf16/fp32 as they
    are; float64 and integer scores as their fp32 dense ranks (the same order and the same
    ties, -inf kept as -inf and NaN as NaN, so nms_select's rules for them still apply).
    Bool and complex scores raise ValueError: they are no relevance."""
    if scores.dtype in FLOAT_DTYPES:
        return scores
    if scores.dtype == torch.bool or scores.is_complex():
        raise ValueError(f"select_frames: scorer must return real scores (floating point or integer), "
                         f"got {scores.dtype}")
    if scores.numel() > MAX_RANKED:
        raise ValueError(f"select_frames: {scores.dtype} scores are ranked exactly through fp32 ranks, "
                         f"which holds at most {MAX_RANKED} candidates, got {scores.numel()}")
    ranks = torch.unique(scores, sorted=True, return_inverse=True)[1].float()
    if scores.is_floating_point():
        ranks = torch.where(scores == float("-inf"), float("-inf"), ranks)
        ranks = torch.where(scores.isnan(), float("nan"), ranks)
    return ranks


def select_frames(video, question, k: int, scorer: Scorer | None = None, candidates: int = 128,
                  radius: int = -1, layout: str | None = None) -> FrameSelection:
    """Pick k frames of one video for a question.

    video: [T, H, W, C] or [T, C, H, W] tensor (or numpy array), usually uint8 pixels;
    layout ('THWC' / 'TCHW') is inferred from which dimension has 1 or 3 channels
    unless given. min(candidates, T) frames are sampled uniformly (uniform_indices),
    handed to scorer as [1, N, H, W, C] (channels last) and scored, then nms_select
    picks k of them with `radius` counted in candidate positions (-1: N // (4k)).
    k, candidates and radius are ints. The scorer's scores are ranked in their own precision
    (float64 and integer scores exactly, see ranking_scores; bool or complex scores raise).
    scorer=None is the uniform baseline (UniformScorer): k evenly spaced frames of the
    whole video, without NMS. Returns a FrameSelection; indices index the video.
    """
    k = check_int("select_frames", "k", k)
    candidates = check_int("select_frames", "candidates", candidates, minimum=1)
    radius = check_int("select_frames", "radius", radius)
    video = torch.as_tensor(video)
    if video.dim() != 4:
        raise ValueError(f"select_frames: video must be a 4-D tensor [T, H, W, C] or [T, C, H, W], "
                         f"got shape {shape_str(video)}")
    channels_last = _channels_last(video, layout)
    T = video.shape[0]
    N = min(candidates, T)
    scorer = UniformScorer() if scorer is None else scorer
    uniform = isinstance(scorer, UniformScorer)
    limit = T if uniform else N
    if not 0 <= k <= limit:
        what = f"T={T}" if uniform else f"min(candidates, T)={N}"
        raise ValueError(f"select_frames: k must be in [0, {what}], got {k}")

    cand = uniform_indices(T, N).to(video.device)
    if uniform:
        idx = uniform_indices(T, k).to(video.device)
        return FrameSelection(idx, video[idx], cand, torch.zeros(N))

    frames = video[cand] if channels_last else video[cand].permute(0, 2, 3, 1)
    scores = scorer(frames[None], question)
    if not isinstance(scores, Tensor) or scores.shape != (1, N):
        got = shape_str(scores) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"select_frames: scorer must return scores [1, {N}] (one per candidate frame), got {got}")
    # The picks are indices: no gradient to carry, so a scorer's autograd graph is left behind.
    picked = nms_select(ranking_scores(scores.detach()), k, radius)[0]
    idx = cand[picked.to(cand.device)]
    return FrameSelection(idx, video[idx], cand, scores[0])
