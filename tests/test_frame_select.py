"""Frame selection: uniform sampling, scorers and select_frames around nms_select."""
import pytest
import torch
from transformers import SiglipConfig, SiglipModel

import retake_ops
from retake_ops import FrameSelection, SimilarityScorer, UniformScorer, select_frames, uniform_indices
from tiny_clip import make_clip, make_processor, tiny_towers

@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return make_processor(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def clip(processor):
    return make_clip(processor)


def video_thwc(T=24, H=40, W=36, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (T, H, W, 3), generator=g, dtype=torch.uint8)


def cosine(a, b):
    return torch.nn.functional.normalize(a.double(), dim=-1) @ torch.nn.functional.normalize(b.double(), dim=-1).T


# ---------------------------------------------------------------------------- uniform sampling

@pytest.mark.parametrize("T,k,expected", [
    (10, 0, []), (10, 1, [5]), (10, 2, [2, 7]), (10, 5, [1, 3, 5, 7, 9]), (10, 10, list(range(10))),
    (240, 4, [30, 90, 150, 210]), (7, 3, [1, 3, 5]),
])
def test_uniform_indices(T, k, expected):
    idx = uniform_indices(T, k)
    assert idx.dtype == torch.int64 and idx.tolist() == expected


@pytest.mark.parametrize("T", [1, 2, 97, 1000])
def test_uniform_indices_are_distinct_and_spread(T):
    for k in sorted(k for k in {1, 2, T // 3, T - 1, T} if 1 <= k <= T):
        idx = uniform_indices(T, k)
        assert (idx[1:] > idx[:-1]).all() and 0 <= idx[0] and idx[-1] < T
        # frame t spans [t, t + 1): pick i overlaps its own segment [i T / k, (i + 1) T / k)
        i = torch.arange(k)
        assert ((idx + 1) * k > i * T).all() and (idx * k < (i + 1) * T).all()


def test_uniform_indices_rejects_k_above_t():
    with pytest.raises(ValueError, match=r"uniform_indices: need 0 <= k <= T, got T=3, k=4"):
        uniform_indices(3, 4)


def test_constant_scores_through_nms_pick_from_the_start():
    # Why the uniform baseline bypasses NMS: equal scores tie everywhere, the tie rule takes the
    # lowest index, so the picks crowd the start (radius 128 // 32 = 4: every fifth frame).
    picks = retake_ops.nms_select(torch.zeros(1, 128), 8)
    assert picks[0].tolist() == [0, 5, 10, 15, 20, 25, 30, 35]
    video = video_thwc(T=128, H=4, W=4)
    assert select_frames(video, "q", 8).indices.tolist() == uniform_indices(128, 8).tolist()
    assert UniformScorer()(video[None], "q").tolist() == [[0.0] * 128]


@pytest.mark.parametrize("layout", ["THWC", "TCHW"])
def test_select_frames_uniform(layout):
    video = video_thwc(T=30)
    if layout == "TCHW":
        video = video.permute(0, 3, 1, 2)
    sel = select_frames(video, "what happens?", 6, candidates=16)
    assert isinstance(sel, FrameSelection)
    assert sel.indices.tolist() == uniform_indices(30, 6).tolist() == [2, 7, 12, 17, 22, 27]
    assert torch.equal(sel.frames, video[sel.indices])
    assert sel.candidates.tolist() == uniform_indices(30, 16).tolist()
    assert torch.equal(sel.scores, torch.zeros(16))


# ---------------------------------------------------------------------------- user callables

def brightness(frames, question):
    """A user scorer: mean pixel value per frame, [B, N, H, W, C] -> [B, N]."""
    return frames.float().mean(dim=(2, 3, 4))


@pytest.mark.parametrize("layout", ["THWC", "TCHW"])
def test_select_frames_with_user_callable(layout):
    T = 40
    level = torch.tensor([(t * 37) % 101 for t in range(T)], dtype=torch.uint8)  # distinct levels
    video = level[:, None, None, None].expand(T, 6, 5, 3).clone()
    if layout == "TCHW":
        video = video.permute(0, 3, 1, 2)
    sel = select_frames(video, "the bright part", 4, scorer=brightness, candidates=20, radius=1)
    cand = uniform_indices(T, 20)
    assert sel.candidates.tolist() == cand.tolist()
    assert torch.equal(sel.scores, level[cand].float())
    expected = cand[retake_ops.ref.nms_select(level[cand].float()[None], 4, 1)[0]]
    assert sel.indices.tolist() == expected.tolist()
    assert torch.equal(sel.frames, video[expected])
    # the picks are the brightest candidates with no two neighbouring candidates taken
    pos = torch.searchsorted(cand, sel.indices)
    assert (pos[1:] - pos[:-1] > 1).all()
    assert level[sel.indices].max() == level[cand].max()


def test_select_frames_scorer_sees_candidates_channels_last():
    seen = {}

    def spy(frames, question):
        seen["shape"], seen["question"] = tuple(frames.shape), question
        return torch.arange(frames.shape[1], dtype=torch.float64)[None]  # float64 is accepted

    video = video_thwc(T=50, H=8, W=10).permute(0, 3, 1, 2)
    sel = select_frames(video, "why?", 3, scorer=spy, candidates=10, radius=0)
    assert seen == {"shape": (1, 10, 8, 10, 3), "question": "why?"}
    assert sel.indices.tolist() == uniform_indices(50, 10)[7:].tolist()


def test_select_frames_numpy_and_small_videos():
    video = video_thwc(T=5, H=4, W=4)
    sel = select_frames(video.numpy(), "q", 5, scorer=brightness)  # candidates > T: all frames
    assert sel.indices.tolist() == [0, 1, 2, 3, 4] and sel.candidates.tolist() == [0, 1, 2, 3, 4]
    assert select_frames(video, "q", 0, scorer=brightness).indices.shape == (0,)


@pytest.mark.parametrize("kwargs,message", [
    (dict(video=torch.zeros(4, 8, 8, dtype=torch.uint8)),
     r"select_frames: video must be a 4-D tensor \[T, H, W, C\] or \[T, C, H, W\], got shape \[4, 8, 8\]"),
    (dict(video=torch.zeros(4, 3, 8, 3, dtype=torch.uint8)),
     r"select_frames: cannot tell the channel dimension of video \[4, 3, 8, 3\]: pass layout="),
    (dict(video=torch.zeros(4, 8, 8, 8, dtype=torch.uint8)),
     r"select_frames: cannot tell the channel dimension of video \[4, 8, 8, 8\]: pass layout="),
    (dict(layout="HWC"), r"select_frames: layout must be 'THWC', 'TCHW' or None, got 'HWC'"),
    (dict(candidates=0), r"select_frames: candidates must be >= 1, got 0"),
    (dict(k=9, candidates=8), r"select_frames: k must be in \[0, min\(candidates, T\)=8\], got 9"),
    (dict(k=-1), r"select_frames: k must be in \[0, min\(candidates, T\)=24\], got -1"),
    (dict(k=25, scorer=None), r"select_frames: k must be in \[0, T=24\], got 25"),
    (dict(scorer=lambda f, q: torch.zeros(f.shape[1])),
     r"select_frames: scorer must return scores \[1, 24\] \(one per candidate frame\), got \[24\]"),
    (dict(scorer=lambda f, q: [0.0] * 24),
     r"select_frames: scorer must return scores \[1, 24\] \(one per candidate frame\), got list"),
    (dict(scorer=lambda f, q: torch.full((1, 24), float("nan"))), r"nms_select: scores contains NaN"),
], ids=["rank", "ambiguous", "no-channels", "layout", "candidates", "k-candidates", "k-negative",
        "k-uniform", "scorer-shape", "scorer-type", "scorer-nan"])
def test_select_frames_bad_input(kwargs, message):
    args = dict(video=video_thwc(), question="q", k=3, scorer=brightness)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        select_frames(**args)


def test_ambiguous_layout_resolved_by_argument():
    video = torch.arange(4 * 3 * 5 * 3, dtype=torch.float32).reshape(4, 3, 5, 3)
    seen = []

    def scorer(frames, question):
        seen.append(tuple(frames.shape))
        return torch.zeros(1, frames.shape[1])

    select_frames(video, "q", 1, scorer=scorer, layout="THWC")
    select_frames(video, "q", 1, scorer=scorer, layout="TCHW")
    assert seen == [(1, 4, 3, 5, 3), (1, 4, 5, 3, 3)]


# ---------------------------------------------------------------------------- similarity scorer

def manual_similarity(model, processor, frames, questions):
    """[B, N] cosine similarities in fp64 straight from the model's two towers."""
    with torch.no_grad():
        img = [model.get_image_features(**processor(images=[f.numpy() for f in row], return_tensors="pt"))
               for row in frames]
        txt = model.get_text_features(**processor(text=questions, return_tensors="pt", padding=True))
    img = [x if isinstance(x, torch.Tensor) else x.pooler_output for x in img]
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return torch.stack([cosine(img_b, txt[b:b + 1])[:, 0] for b, img_b in enumerate(img)])


@pytest.mark.parametrize("batch_size", [1, 4, 64])
def test_similarity_scorer_matches_the_model(clip, processor, batch_size):
    frames = torch.stack([video_thwc(T=7, seed=1), video_thwc(T=7, seed=2)])  # [2, 7, H, W, 3]
    questions = ["where is the red ball?", "who opens the door"]
    scores = SimilarityScorer(clip, processor, batch_size=batch_size)(frames, questions)
    assert scores.shape == (2, 7) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), manual_similarity(clip, processor, frames, questions),
                               rtol=0, atol=1e-5)
    # one question string is shared by every row
    shared = SimilarityScorer(clip, processor)(frames, questions[0])
    torch.testing.assert_close(shared[0], scores[0], rtol=0, atol=1e-6)


def test_similarity_scorer_on_features_picks_matching_frames(clip, processor):
    scorer = SimilarityScorer(clip, processor)
    question = "where is the cat"
    txt = scorer.text_embeddings([question])[0]
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(1, 64, txt.numel(), generator=g)
    matching = [5, 30, 50]
    feats[0, matching] = txt * torch.tensor([2.0, 0.5, 3.0])[:, None]  # cosine 1 whatever the norm
    scores = scorer(feats, question)
    torch.testing.assert_close(scores[0, matching], torch.ones(3), rtol=0, atol=1e-5)
    assert retake_ops.nms_select(scores, 3)[0].tolist() == matching


def test_similarity_scorer_rejects_bad_inputs(clip, processor):
    scorer = SimilarityScorer(clip, processor)
    with pytest.raises(ValueError, match=r"SimilarityScorer: frames_or_features must be pixels \[B, N, H, W, C\] "
                                         r"or float features \[B, N, D\], got torch.uint8 \[2, 3, 4\]"):
        scorer(torch.zeros(2, 3, 4, dtype=torch.uint8), "q")
    with pytest.raises(ValueError, match=r"SimilarityScorer: question must be a str or a sequence of B=2 str"):
        scorer(torch.zeros(2, 3, 16), ["only one"])
    with pytest.raises(ValueError, match=r"SimilarityScorer: batch_size must be >= 1, got 0"):
        SimilarityScorer(clip, processor, batch_size=0)


def test_similarity_scorer_with_siglip(processor):
    torch.manual_seed(1)
    text, vision = tiny_towers(len(processor.tokenizer))
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=vision)).eval()
    scorer = SimilarityScorer(model, processor)
    assert scorer.text_kwargs == {"padding": "max_length", "max_length": 40, "truncation": True}
    frames = video_thwc(T=5, seed=4)[None]
    with torch.no_grad():
        img = model.get_image_features(**processor(images=[f.numpy() for f in frames[0]], return_tensors="pt"))
        txt = model.get_text_features(**processor(text=["a dog"], return_tensors="pt", **scorer.text_kwargs))
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    torch.testing.assert_close(scorer(frames, "a dog").double(), cosine(img, txt).T, rtol=0, atol=1e-5)


def test_select_frames_with_tiny_clip_on_a_synthetic_video(clip, processor):
    # The demo's call: a 240-frame 64x64 video, a tiny random CLIP, on CPU.
    T = 240
    t = torch.arange(T, dtype=torch.float32)
    x = torch.linspace(0, 1, 64)
    red = (127 + 120 * torch.sin(t[:, None, None] / 9 + x[None, :, None] * 6)).expand(T, 64, 64)
    video = torch.stack([red, red.flip(1), torch.full_like(red, 60)], dim=-1).to(torch.uint8)
    scorer = SimilarityScorer(clip, processor)
    sel = select_frames(video, "when does the red stripe move?", 8, scorer=scorer)
    cand = uniform_indices(T, 128)
    assert sel.candidates.tolist() == cand.tolist()
    assert sel.indices.shape == (8,) and (sel.indices[1:] > sel.indices[:-1]).all()
    assert torch.equal(sel.frames, video[sel.indices])
    direct = scorer(video[cand][None], "when does the red stripe move?")
    torch.testing.assert_close(sel.scores, direct[0], rtol=0, atol=0)
    assert sel.indices.tolist() == cand[retake_ops.ref.nms_select(direct, 8)[0]].tolist()


# ---------------------------------------------------------------------------- scores in their own precision

def returning(scores):
    """A scorer that returns fixed scores [1, N] whatever the frames."""
    return lambda frames, question: scores


def expected_picks(video_T, levels, k, radius):
    """The frames greedy NMS picks (every frame a candidate) by fp32 `levels` that order and
    tie exactly as the scores under test."""
    return uniform_indices(video_T, video_T)[retake_ops.ref.nms_select(levels, k, radius)[0]].tolist()


def test_float64_near_ties_are_not_rounded():
    """1 + 1e-12 and 1 + 2e-12 are one value in fp32: rounded, the wrong frames would win."""
    s = torch.tensor([[1.0, 1.0 + 1e-12, 0.5, 1.0 + 2e-12, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7]], dtype=torch.float64)
    video = video_thwc(T=10, H=4, W=4)
    sel = select_frames(video, "q", 2, scorer=returning(s), radius=0)
    assert sel.indices.tolist() == [1, 3] == expected_picks(10, torch.tensor([[10.0, 11, 5, 12, 1, 2, 3, 4, 6, 7]]), 2, 0)
    assert sel.scores.dtype == torch.float64 and torch.equal(sel.scores, s[0])


@pytest.mark.parametrize("radius", [-1, 0, 1, 3])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_float64_scores_rank_exactly(radius, k):
    """Scores 1 + level * 1e-10: fp32 rounds them all to 1.0; -inf frames included."""
    g = torch.Generator().manual_seed(radius + 10 * k)
    levels = torch.randint(0, 50, (1, 40), generator=g).float()  # ties included
    levels[0, torch.randperm(40, generator=g)[:6]] = float("-inf")
    s = 1.0 + levels.double() * 1e-10
    assert (s.float()[levels.isfinite()] == 1.0).all()
    video = video_thwc(T=40, H=4, W=4)
    sel = select_frames(video, "q", k, scorer=returning(s), radius=radius)
    assert sel.indices.tolist() == expected_picks(40, levels, k, radius)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_scores_rank_exactly(dtype):
    base = {torch.int64: 1 << 40, torch.int32: 1 << 25, torch.uint8: 0}[dtype]
    g = torch.Generator().manual_seed(3)
    levels = torch.randperm(30, generator=g)[None] // 2  # ties included
    s = (base + levels * (1 if dtype != torch.uint8 else 7)).to(dtype)
    video = video_thwc(T=30, H=4, W=4)
    for k, radius in ((4, 0), (6, 2), (30, -1)):
        sel = select_frames(video, "q", k, scorer=returning(s), radius=radius)
        assert sel.indices.tolist() == expected_picks(30, levels.float(), k, radius)


def test_float64_nan_scores_raise():
    s = torch.zeros(1, 10, dtype=torch.float64)
    s[0, 4] = float("nan")
    with pytest.raises(ValueError, match=r"nms_select: scores contains NaN"):
        select_frames(video_thwc(T=10, H=4, W=4), "q", 2, scorer=returning(s))


@pytest.mark.parametrize("dtype", [torch.bool, torch.complex64, torch.complex128])
def test_rejects_scores_that_are_not_real_numbers(dtype):
    s = torch.ones(1, 10, dtype=dtype)
    with pytest.raises(ValueError, match=rf"select_frames: scorer must return real scores \(floating point or "
                                         rf"integer\), got {dtype}"):
        select_frames(video_thwc(T=10, H=4, W=4), "q", 2, scorer=returning(s))


def test_scores_that_require_grad_are_ranked_and_returned_as_they_are():
    s = torch.randn(1, 10, requires_grad=True)
    sel = select_frames(video_thwc(T=10, H=4, W=4), "q", 3, scorer=lambda f, q: s * 2, radius=0)
    assert sel.indices.tolist() == sorted((s * 2).topk(3).indices[0].tolist())
    assert sel.scores.requires_grad


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=2.0), r"select_frames: k must be an int, got 2.0 \(float\)"),
    (dict(k=True), r"select_frames: k must be an int, got True \(bool\)"),
    (dict(k="2"), r"select_frames: k must be an int, got '2' \(str\)"),
    (dict(candidates=8.5), r"select_frames: candidates must be an int, got 8.5 \(float\)"),
    (dict(radius=1.0), r"select_frames: radius must be an int, got 1.0 \(float\)"),
])
@pytest.mark.parametrize("scorer", [None, brightness], ids=["uniform", "scorer"])
def test_select_frames_rejects_non_int_counts(kwargs, message, scorer):
    args = dict(video=video_thwc(), question="q", k=3, scorer=scorer)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        select_frames(**args)


def test_select_frames_accepts_numpy_ints():
    np = pytest.importorskip("numpy")
    sel = select_frames(video_thwc(T=20, H=4, W=4), "q", np.int64(3), scorer=brightness, candidates=np.int32(10))
    assert sel.indices.shape == (3,)


@pytest.mark.parametrize("T,k,message", [(10, 2.0, r"uniform_indices: k must be an int, got 2.0 \(float\)"),
                                          (10.0, 2, r"uniform_indices: T must be an int, got 10.0 \(float\)")])
def test_uniform_indices_rejects_non_ints(T, k, message):
    with pytest.raises(ValueError, match=message):
        uniform_indices(T, k)
