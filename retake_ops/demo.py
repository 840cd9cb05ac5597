"""The main job: a long video through a VideoLLM with ReTaKe, plus its two building blocks.

    retake-ops-demo                   # synthetic video with hard cuts (or python -m retake_ops.demo)
    retake-ops-demo --video clip.mp4  # a real video, decoded with PyAV
    retake-ops-demo --question "Where is the red scene?" --select 8
    retake-ops-demo --model DIR       # a local Qwen2-VL / Qwen2.5-VL checkpoint instead of the tiny one
    retake-ops-demo --family glm4v    # a tiny model of another family apply_retake supports

VideoLLM: the video goes through a Qwen2-VL (by default a tiny one with random weights, built
from a config: no download, and its answers are random tokens) twice, as is and with
retake_ops.hf.apply_retake (DPSelect on the model's own frame features, chunked prefill with
PivotKV); the demo prints the frames kept, the keyframes, the KV tokens each layer holds,
prefill time and peak memory of both runs, and plots them. The ReTaKe run also encodes the video
once (RetakeHandle.encode of the prompt up to the end of the video: a VideoMemory) and asks it two
questions (a checkpoint's tokenizer: --question and SECOND_QUESTION; a tiny model: fixed token ids),
each answer timed against a fresh ReTaKe generate() of the prompt and that question. A third prefill
adds AdaReTaKe's budgets to the same config (temporal_budgets=True, layer_budgets="adakv"); the demo
prints the range of the chunks' keep ratios and novelty and of the layers' budgets, and plots them.
`--family` runs a much smaller model of that family instead (2 layers of width 64, 8 x 8 pixel
frames: the one the tests run).

DPSelect: frames become features by a fixed random projection of pixel patches (a
stand-in for a vision encoder), then retake_ops.dpselect keeps `--keep` of the frames,
keyframes (distance peaks) first.
Frame selection: retake_ops.select_frames scores candidate frames for `--question`
and greedy NMS picks `--select` relevant, spread-out frames. The scorer is a CLIP or
SigLIP checkpoint from a local folder (`--clip DIR`), or without one a transparent
colour scorer that understands questions naming red, green or blue (the synthetic
video's shots are tinted), so the demo runs offline.
Writes PNGs of the distance curve (peaks, kept frames), the relevance scores (selected
frames), the VideoLLM runs (videollm.png) and AdaReTaKe's budgets (videollm_budgets.png: each
chunk's keep ratio against its novelty, and the tokens each layer keeps of each chunk).
"""
import argparse
import pathlib

import torch
import torch.nn.functional as F

import retake_ops

SIZE = 64    # frames are resized to SIZE x SIZE before feature extraction
GRID = 4     # GRID x GRID patches per frame -> N = 16
DIM = 256    # feature dimension C


def synthetic_video(frames: int, shots: int, seed: int):
    """uint8 [T, SIZE, SIZE, 3]: `shots` scenes with hard cuts, slow drift and pixel noise.

    Returns the video and the frame indices where a new shot starts (the cuts)."""
    if not 1 <= shots <= frames:
        raise ValueError(f"synthetic_video: shots must be in [1, frames={frames}], got {shots}")
    g = torch.Generator().manual_seed(seed)
    # Shots last at least half their fair share, so cuts are further apart than a peak window.
    min_len = max(1, frames // (2 * shots))
    extra = torch.rand(shots, generator=g)
    lengths = (extra / extra.sum() * (frames - shots * min_len)).long() + min_len
    lengths[-1] += frames - lengths.sum()
    cuts = lengths.cumsum(0)[:-1].tolist()
    starts = [0] + cuts
    tints = torch.randperm(3, generator=g)  # every colour gets shots once there are 3 or more
    video = torch.empty(frames, SIZE, SIZE, 3)
    for s, start in enumerate(starts):
        end = starts[s + 1] if s + 1 < len(starts) else frames
        # A scene wide enough for the camera to pan one pixel per frame to the shot's end,
        # tinted towards red, green or blue in turn.
        scene = F.interpolate(torch.rand(1, 3, 8, 8 + 8 * (end - start) // SIZE, generator=g),
                              size=(SIZE, SIZE + end - start), mode="bicubic")[0] * 0.6
        scene[int(tints[s % 3])] += 0.4
        for t in range(start, end):
            video[t] = scene[:, :, t - start: t - start + SIZE].permute(1, 2, 0)
    video += 0.03 * torch.randn(video.shape, generator=g)
    return (video.clamp(0, 1) * 255).to(torch.uint8), cuts


def decode_video(path: str, max_frames: int):
    """uint8 [T, SIZE, SIZE, 3] from a file, up to max_frames frames evenly spread."""
    import av

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"--video {path}: no video frames decoded")
    step = max(1, -(-len(frames) // max_frames))
    x = torch.stack([torch.from_numpy(f) for f in frames[::step]]).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8)


def patch_features(video: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> [1, T, GRID*GRID, DIM] fp32 by a fixed random projection of patches."""
    T = video.shape[0]
    p = SIZE // GRID
    x = video.float().div(255).reshape(T, GRID, p, GRID, p, 3).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(T, GRID * GRID, p * p * 3)
    x = x - x.mean(dim=-1, keepdim=True)  # a centred patch makes cosine track content, not brightness
    proj = torch.randn(p * p * 3, DIM, generator=torch.Generator().manual_seed(seed)) / (p * p * 3) ** 0.5
    return (x @ proj).unsqueeze(0)


COLOURS = {"red": 0, "green": 1, "blue": 2}


class ColourScorer:
    """Relevance of RGB frames to a question that names a colour: how much that channel
    outweighs the other two (mean over pixels). Follows the retake_ops.select_frames scorer
    interface; it exists so the demo runs offline, a CLIP/SigLIP scorer is the real thing."""

    def __call__(self, frames, question):
        words = question.lower().replace("?", " ").replace(",", " ").split()
        named = [COLOURS[w] for w in words if w in COLOURS]
        if len(named) != 1:
            raise ValueError(f"--question {question!r}: without --clip the demo scores questions that name "
                             f"exactly one of {sorted(COLOURS)}")
        x = frames.float().div(255).mean(dim=(2, 3))  # [B, N, 3]
        c = named[0]
        return x[..., c] - (x.sum(-1) - x[..., c]) / 2


def clip_scorer(folder: str):
    """A SimilarityScorer from a local CLIP or SigLIP checkpoint (no downloads)."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    return retake_ops.SimilarityScorer(model, processor)


def plot(path, dist, peaks, kept, cuts, selection=None, question=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.arange(len(dist))
    rows = 1 if selection is None else 2
    fig, axes = plt.subplots(rows, 1, figsize=(12, 4 * rows), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for i, c in enumerate(cuts):
        ax.axvline(c, color="0.8", lw=4, zorder=0, label="true cut" if i == 0 else None)
    ax.plot(t, dist, color="tab:blue", lw=1, label="frame distance")
    ax.scatter(t[kept], dist[kept], s=18, color="tab:green", label=f"kept ({len(kept)})", zorder=3)
    ax.scatter(t[peaks], dist[peaks], s=60, facecolors="none", edgecolors="tab:red",
               label=f"keyframes / peaks ({int(peaks.sum())})", zorder=4)
    ax.set_ylabel("1 - cos(prev, cur), patch mean")
    ax.set_title("DPSelect")
    ax.legend(loc="upper right", fontsize=8)
    if selection is not None:
        ax = axes[1, 0]
        for i, c in enumerate(cuts):
            ax.axvline(c, color="0.8", lw=4, zorder=0, label="true cut" if i == 0 else None)
        ax.plot(selection.candidates, selection.scores, ".-", color="tab:purple", lw=1, ms=3,
                label="relevance of candidate frames")
        picked = torch.isin(selection.candidates, selection.indices)
        ax.scatter(selection.candidates[picked], selection.scores[picked], s=70, marker="*", color="tab:orange",
                   label=f"selected by NMS ({len(selection.indices)})", zorder=4)
        ax.set_ylabel("relevance")
        ax.set_title(f"Frame selection for: {question}")
        ax.legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel("frame")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def load_videollm(folder: str | None, family: str | None):
    """(model, note): a local Qwen2-VL / Qwen2.5-VL checkpoint, a family's tiny model, or the tiny Qwen2-VL."""
    from .hf import tiny

    if family is not None:
        model = tiny.build(family)
        return model, f"a tiny {family} ({type(model).__name__}) with random weights, built from a config (no download)"
    if folder is None:  # a language model that outweighs the vision tower, as in real VideoLLMs
        return (tiny.tiny_qwen2_vl(layers=8, hidden=512),
                "a tiny Qwen2-VL with random weights, built from a config (no download)")
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    model_type = AutoConfig.from_pretrained(folder, local_files_only=True).model_type
    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    if model_type not in classes:
        raise ValueError(f"--model {folder}: the demo runs Qwen2-VL and Qwen2.5-VL checkpoints (model_type "
                         f"{sorted(classes)}), got {model_type!r}; other families work through "
                         "retake_ops.hf.apply_retake in your own code")
    model = classes[model_type].from_pretrained(folder, local_files_only=True, attn_implementation="sdpa").eval()
    return model, f"{model_type} from {folder}"


SECOND_QUESTION = "What happens at the end of the video?"  # asked of the memory after --question
TINY_QUESTIONS = ([20, 21, 22, 23], [24, 25, 26])  # the two questions' ids in a tiny model's vocabulary


def videollm_prompt(model, folder, family, video, questions):
    """(make, asked): make(ids) is the processor-shaped input of the prompt, the video and the text `ids` after it
    (make([]) ends right after the video: the prompt RetakeHandle.encode takes), with the checkpoint's tokenizer
    and normalization when it has them; asked are the token ids of each of the (two) `questions`, tokenized by
    the checkpoint's tokenizer, or else the tiny vocabulary's TINY_QUESTIONS."""
    import json

    from .hf import tiny

    asked = [list(ids) for ids in TINY_QUESTIONS[:len(questions)]]
    if family is not None:
        frames = tiny.video_frames(model, video)
        return (lambda ids: tiny.make_inputs(family, [frames], questions=[list(ids)])), asked
    mean, std, prompt = tiny.CLIP_MEAN, tiny.CLIP_STD, [5, 6, 7]
    if folder is not None:
        config = pathlib.Path(folder) / "preprocessor_config.json"
        if config.exists():
            settings = json.loads(config.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        if (pathlib.Path(folder) / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            prompt = tokenizer("<|im_start|>user\n")["input_ids"]
            asked = [tokenizer(f"{q}<|im_end|>\n<|im_start|>assistant\n")["input_ids"] for q in questions]
    patch = model.config.vision_config.patch_size * model.config.vision_config.spatial_merge_size
    size = max(patch, round(112 / patch) * patch)

    def make(ids):
        return tiny.video_inputs(model, [video], [prompt], [list(ids)], size=size, mean=mean, std=std)

    return make, asked


def _timed(fn, device):
    """(fn(), its wall-clock seconds, the device's queued work included)."""
    import time

    def sync():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def ask_memory(model, handle, make, asked, max_new_tokens, first):
    """Encode the video once (handle.encode of make([]), the prompt ending after the video), then answer each
    question of `asked` on the memory and by a fresh ReTaKe generate() of the prompt and the question (the
    same patch and max_new_tokens), each the faster of two runs. first: (answer, seconds) of one fresh
    generate() of question 1, already run. Returns the encode's seconds, the memory's bytes and, per question,
    both answers and times."""
    generate = dict(max_new_tokens=max_new_tokens, do_sample=False)
    encode_inputs = make([])
    device = encode_inputs["input_ids"].device
    memory, encode_seconds = _timed(lambda: handle.encode(**encode_inputs), device)

    def best_of_two(inputs, done=None):
        runs = [done] if done is not None else []
        while len(runs) < 2:
            # question_inputs copies the memory for each answer: the memory stays as encoded
            batch = inputs() if callable(inputs) else inputs
            tokens, seconds = _timed(lambda: model.generate(**batch, **generate), device)
            runs.append((tokens[0, batch["input_ids"].shape[1]:].tolist(), seconds))
        return runs[0][0], min(seconds for _, seconds in runs)

    questions = []
    for i, ids in enumerate(asked):
        fresh, fresh_seconds = best_of_two(make(ids), first if i == 0 else None)
        answer, seconds = best_of_two(lambda: memory.question_inputs([ids]))
        questions.append({"ids": list(ids), "memory_seconds": seconds, "fresh_seconds": fresh_seconds,
                          "memory_answer": answer, "fresh_answer": fresh})
    return {"encode_seconds": encode_seconds, "bytes": memory.nbytes(), "questions": questions}


def _speedup(fresh, memory):
    ratio = fresh / memory
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.1f}x"


def videollm_stage(args, video, out):
    """Prefill (and a few greedy tokens) with and without ReTaKe, then a prefill with AdaReTaKe's budgets;
    returns the figures."""
    import dataclasses
    import time

    from ._measure import peak_bytes
    from .hf import RetakeConfig, apply_retake

    model, note = load_videollm(args.model, args.family)
    make, asked = videollm_prompt(model, args.model, args.family, video, [args.question, SECOND_QUESTION])
    inputs = make(asked[0])
    tps = getattr(model.config.vision_config, "temporal_patch_size", 1)  # LLaVA-OneVision: a frame each
    config = RetakeConfig(frame_keep_ratio=args.frame_keep, kv_keep_ratio=args.kv_keep, chunk_frames=args.chunk_frames,
                          window=args.window)
    print(f"VideoLLM: {note}")
    runs = {}
    with torch.no_grad():
        for name in ("plain", "retake"):
            handle = apply_retake(model, config) if name == "retake" else None
            try:
                seconds = float("inf")
                for _ in range(2):  # the faster of two runs: the first also warms up
                    start = time.perf_counter()
                    model(**inputs, logits_to_keep=1)
                    seconds = min(seconds, time.perf_counter() - start)
                device = inputs["input_ids"].device
                _, peak = peak_bytes(lambda: model(**inputs, logits_to_keep=1), device)
                tokens, generate_seconds = _timed(
                    lambda: model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False), device)
                answer = tokens[0, inputs["input_ids"].shape[1]:].tolist()
                report = handle.report if handle is not None else None
                if handle is not None:  # the video encoded once, then asked both questions
                    memory = ask_memory(model, handle, make, asked, args.max_new_tokens, (answer, generate_seconds))
            finally:
                if handle is not None:
                    handle.remove()
            runs[name] = dict(seconds=seconds, peak=peak, report=report, answer=answer)
        # The budgets change only what the prefill keeps, so one untimed prefill is enough to report them.
        with apply_retake(model, dataclasses.replace(config, temporal_budgets=True, layer_budgets="adakv")) as handle:
            model(**inputs, logits_to_keep=1)
        budgets = handle.report
    real = int(inputs["attention_mask"].sum())
    report = runs["retake"]["report"]
    v = report.videos[0]
    grid_t, video_tokens = v.frames, v.tokens
    layers, held = held_per_layer(report)
    kept_groups, key_groups = v.kept_frames.tolist(), v.keyframes.tolist()
    print(f"  video: {video.shape[0]} frames -> {grid_t} temporal groups of {tps} frame{'s' * (tps > 1)}, "
          f"{video_tokens} video tokens, {real} tokens in all")
    print(f"  DPSelect kept {len(kept_groups)} of {grid_t} groups (frame_keep_ratio={args.frame_keep}, "
          f"window={args.window}); keyframe groups: {key_groups}")
    print(f"  kept frames (first of each group): {[g * tps for g in kept_groups]}")
    which = "" if len(held) == len(report.positions) else f" (full-attention layers {layers})"
    print(f"  KV tokens held per layer{which}: plain {real} each; ReTaKe {held} (kv_keep_ratio={args.kv_keep}, "
          f"chunk_frames={args.chunk_frames})")
    for name, label in (("plain", "without ReTaKe"), ("retake", "with ReTaKe   ")):
        r = runs[name]
        print(f"  prefill {label}: {r['seconds']:.2f} s, peak memory {r['peak'] / 2**20:.1f} MiB "
              f"(on top of the model); greedy tokens {r['answer']}")
    print(f"  video memory: encoded once (handle.encode of the prompt up to the end of the video) in "
          f"{memory['encode_seconds']:.3f} s, {memory['bytes'] / 2**20:.1f} MiB of keys and values")
    for i, q in enumerate(memory["questions"]):
        same = "as fresh" if q["memory_answer"] == q["fresh_answer"] else f"fresh {q['fresh_answer']}"
        print(f"  question {i + 1} ({len(q['ids'])} tokens): {q['memory_seconds']:.3f} s on the memory vs "
              f"{q['fresh_seconds']:.3f} s fresh ({_speedup(q['fresh_seconds'], q['memory_seconds'])}); greedy "
              f"tokens {q['memory_answer']} ({same})")
    a = budgets.videos[0]
    novelty, ratios = a.chunk_novelty.tolist(), a.chunk_ratios.tolist()
    print(f"  temporal_budgets=True: {len(ratios)} chunk{'s' * (len(ratios) > 1)}, novelty d_c "
          f"{min(novelty):.3f}..{max(novelty):.3f} -> keep ratio r_c {min(ratios):.3f}..{max(ratios):.3f} "
          f"(mean {sum(ratios) / len(ratios):.2f}; {v.kv_keep_ratio} each without)")
    kept_a = a.layer_kept
    share = even_shares(kept_a)[1]
    held_a = [int(h[0]) for h in budgets.held_tokens() if h is not None]
    print(f"  layer_budgets='adakv': a layer keeps {float(share.min()):.2f}x..{float(share.max()):.2f}x its chunk's "
          f"even budget ({int(kept_a.min())}..{int(kept_a.max())} tokens per chunk); with both, KV tokens held "
          f"per layer {held_a}")
    png = out / "videollm.png"
    plot_videollm(png, grid_t, kept_groups, key_groups, real, layers, held, runs, len(report.positions))
    print(f"wrote {png}")
    budgets_png = out / "videollm_budgets.png"
    plot_budgets(budgets_png, v, a, budgets.compressed_layers, tps)
    print(f"wrote {budgets_png}")
    return {"groups": grid_t, "kept_groups": kept_groups, "keyframe_groups": key_groups, "held": held,
            "layers": layers, "tokens": real, "png": str(png), "memory": memory,
            "seconds": {k: r["seconds"] for k, r in runs.items()}, "peak": {k: r["peak"] for k, r in runs.items()},
            "budgets": {"novelty": novelty, "ratios": ratios, "flat_ratios": v.chunk_ratios.tolist(),
                        "layer_kept": kept_a.tolist(), "layers": budgets.compressed_layers, "held": held_a,
                        "png": str(budgets_png)}}


def held_per_layer(report):
    """(layers, held): the layers PivotKV compressed (report.compressed_layers: every layer, but a hybrid model's
    full-attention ones only) and the KV tokens each of them holds after the prefill (row 0)."""
    tokens = report.held_tokens()
    layers = report.compressed_layers
    return layers, [int(tokens[i][0]) for i in layers]


def plot_held(ax, layers, held, real, total_layers):
    """The KV tokens each compressed layer holds with ReTaKe (a bar per layer, named by its index in the model,
    the tick labels thinned to fit), against the `real` tokens every layer holds without (a line)."""
    ax.bar(range(len(layers)), held, color="tab:blue", label="with ReTaKe")
    ax.axhline(real, color="tab:gray", ls="--", label=f"without ReTaKe ({real})")
    ax.set_xlim(-0.5, len(layers) - 0.5)
    # Up to 12 layers every one is named ("auto" would thin 8 already), more: as many as the axis fits.
    _index_ticks(ax.xaxis, [str(layer) for layer in layers], most=len(layers) if len(layers) <= 12 else "auto")
    ax.set_ylim(0, 1.35 * max([real] + held))  # the top for the legend
    ax.legend(loc="upper right", fontsize=8)
    hybrid = len(layers) < total_layers
    ax.set_xlabel(f"full-attention layer (of {total_layers}; the others hold no KV)" if hybrid else "layer")
    ax.set_ylabel("KV tokens held")


def plot_videollm(path, groups, kept, keys, real, layers, held, runs, total_layers):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [3, 2, 2]})
    ax.eventplot([range(groups), kept, keys], colors=["0.8", "tab:green", "tab:red"], lineoffsets=[2, 1, 0],
                 linelengths=0.8)
    ax.set_yticks([2, 1, 0], ["all groups", f"kept ({len(kept)})", f"keyframes ({len(keys)})"])
    ax.set_xlabel("temporal group")
    ax.set_title("DPSelect on the model's own frame features")
    plot_held(bx, layers, held, real, total_layers)
    bx.set_title("KV cache after the prefill")
    names = ["plain", "ReTaKe"]
    seconds = [runs["plain"]["seconds"], runs["retake"]["seconds"]]
    peaks = [runs["plain"]["peak"] / 2**20, runs["retake"]["peak"] / 2**20]
    cx.bar([0, 1], seconds, width=0.4, color="tab:orange", label="prefill s")
    cx2 = cx.twinx()
    cx2.bar([0.4, 1.4], peaks, width=0.4, color="tab:purple", label="peak MiB")
    cx.set_xticks([0.2, 1.2], names)
    cx.set_ylabel("prefill seconds")
    cx2.set_ylabel("peak MiB")
    cx.set_title("prefill time (orange), peak memory (purple)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _index_ticks(axis, labels, most="auto"):
    """Integer ticks on an axis of indices into `labels`, at most about `most` of them ("auto": as many as
    the axis length fits for short labels), named by the labels."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=most, integer=True))
    axis.set_major_formatter(FuncFormatter(lambda x, _: labels[int(x)] if 0 <= x < len(labels) else ""))


def even_shares(layer_kept):
    """(even budget per chunk [C], each layer's tokens over it [C, layers]) of a VideoReport's layer_kept: the
    mean over the layers is the even budget, as adakv's budgets of a chunk sum to layers x it."""
    even = layer_kept.double().mean(1)
    return even, layer_kept / even[:, None]


def plot_budgets(path, flat, ada, layers, tps):
    """AdaReTaKe's budgets on one video: flat, ada are its VideoReports without and with them (same chunks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    chunks = len(ada.chunk_ratios)
    starts = (ada.kept_frames[ada.chunk_starts[:-1]] * tps).tolist()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.3]})
    x = torch.arange(chunks).numpy()
    ax.bar(x, ada.chunk_ratios.numpy(), width=0.6, color="tab:blue",
           label=f"r_c, temporal_budgets=True (mean {float(ada.chunk_ratios.mean()):.2f})")
    ax.hlines(flat.chunk_ratios.numpy(), x - 0.3, x + 0.3, colors="black", linestyles="--",
              label="r_c without (kv_keep_ratio)")
    ax.set_ylabel("chunk keep ratio r_c")
    # Both axes leave their top third to the legend, so that no bar or point hides under it.
    ax.set_ylim(0, 1.5)
    ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax2 = ax.twinx()
    ax2.plot(x, ada.chunk_novelty.numpy(), "o-", color="tab:red", label="novelty d_c")
    ax2.set_ylabel("chunk novelty d_c", color="tab:red")
    ax2.set_ylim(0, float(ada.chunk_novelty.max()) * 1.5 or 1.0)  # a lone chunk has no novelty
    _index_ticks(ax.xaxis, [f"{c}\nframe {s}" for c, s in enumerate(starts)], most=6)  # wide labels
    ax.set_xlabel("prefill chunk (first kept frame)")
    handles = [h for each in (ax, ax2) for h in each.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper center", ncols=2, fontsize=8)
    ax.set_title("temporal_budgets=True: novel chunks keep more")

    kept = ada.layer_kept
    even, share = even_shares(kept)
    span = max(float((share - 1).abs().max()), 0.05)
    im = bx.imshow(share.numpy(), cmap="coolwarm", norm=Normalize(1 - span, 1 + span), aspect="auto")
    if kept.shape[0] <= 12 and kept.shape[1] <= 16:  # smaller cells leave no room for their numbers
        for c in range(kept.shape[0]):
            for i in range(kept.shape[1]):
                bx.text(i, c, int(kept[c, i]), ha="center", va="center", fontsize=8)
    _index_ticks(bx.xaxis, [str(layer) for layer in layers])
    _index_ticks(bx.yaxis, [f"chunk {c}: even {e:g}" for c, e in enumerate(even.tolist())])
    bx.set_xlabel("layer")
    fig.colorbar(im, ax=bx, label="tokens kept / even budget")
    bx.set_title("layer_budgets='adakv': video tokens each layer keeps per chunk")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", help="decode this video file with PyAV instead of the synthetic one")
    ap.add_argument("--frames", type=int, default=240, help="synthetic video length, or max frames decoded")
    ap.add_argument("--shots", type=int, default=6, help="shots in the synthetic video")
    ap.add_argument("--keep", type=float, default=0.25, help="fraction of frames kept, in (0, 1]")
    ap.add_argument("--window", type=int, default=9, help="peak window (odd)")
    ap.add_argument("--question", default="Which scenes are red?", help="question for frame selection")
    ap.add_argument("--select", type=int, default=8, help="frames to select for the question (0: skip)")
    ap.add_argument("--candidates", type=int, default=128, help="frames scored for the question")
    ap.add_argument("--clip", help="local folder of a CLIP or SigLIP checkpoint used to score frames")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="out", help="folder for the PNGs")
    llm = ap.add_mutually_exclusive_group()
    llm.add_argument("--model", help="local Qwen2-VL / Qwen2.5-VL checkpoint folder (default: a tiny random one)")
    llm.add_argument("--family", help="run a tiny random VideoLLM of this family (its model_type, e.g. glm4v; an "
                                      "unknown one lists them) instead of the default tiny Qwen2-VL")
    ap.add_argument("--no-llm", action="store_true", help="skip the VideoLLM stage")
    ap.add_argument("--frame-keep", type=float, default=0.5, help="ReTaKe frame_keep_ratio")
    ap.add_argument("--kv-keep", type=float, default=0.4, help="ReTaKe kv_keep_ratio")
    ap.add_argument("--chunk-frames", type=int, default=32, help="ReTaKe chunk_frames")
    ap.add_argument("--max-new-tokens", type=int, default=8,
                    help="greedy tokens generated after each prefill and for each answer on the memory")
    args = ap.parse_args(argv)
    if args.family is not None:
        try:
            from .hf.tiny import BUILDERS
        except ImportError as err:
            ap.error(f"--family needs transformers: {err}")
        if args.family not in BUILDERS:
            ap.error(f"--family {args.family!r}: expected one of {', '.join(BUILDERS)}")

    if args.video:
        video, cuts = decode_video(args.video, args.frames), []
        print(f"decoded {video.shape[0]} frames from {args.video}")
    else:
        video, cuts = synthetic_video(args.frames, args.shots, args.seed)
        print(f"synthetic video: {video.shape[0]} frames, {args.shots} shots, cuts at {cuts}")

    feats = patch_features(video, args.seed)
    T = feats.shape[1]
    k = retake_ops.target_frames(T, args.keep)
    idx, is_pivot = retake_ops.dpselect(feats, k, window=args.window)
    dist = retake_ops.frame_distance(feats)[0]
    peaks = retake_ops.local_peaks(dist, args.window)
    keyframes = idx[0][is_pivot[0]].tolist()

    print(f"kernels: {retake_ops.build_info()['ops']['dpselect']}")
    print(f"kept {k} of {T} frames (keep={args.keep}, window={args.window})")
    print(f"keyframes (pivots): {keyframes}")
    print(f"other kept frames:  {idx[0][~is_pivot[0]].tolist()}")
    if cuts:
        found = [c for c in cuts if c in keyframes]
        print(f"cuts that became keyframes: {len(found)}/{len(cuts)} {found}")

    selection = None
    if args.select:
        scorer = clip_scorer(args.clip) if args.clip else ColourScorer()
        selection = retake_ops.select_frames(video, args.question, args.select, scorer=scorer,
                                             candidates=args.candidates)
        print(f"question: {args.question!r} ({type(scorer).__name__}, "
              f"{len(selection.candidates)} candidates, nms_select)")
        print(f"selected frames: {selection.indices.tolist()}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "dpselect.png"
    plot(png, dist, peaks, idx[0], cuts, selection, args.question)
    print(f"wrote {png}")
    result = {"keyframes": keyframes, "kept": idx[0].tolist(), "cuts": cuts, "png": str(png),
              "selected": [] if selection is None else selection.indices.tolist()}
    if not args.no_llm:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("VideoLLM stage skipped: it needs transformers (pip install 'retake-ops[demo]')")
            return result
        result["videollm"] = videollm_stage(args, video, out)
    return result


def cli() -> int:
    """Entry point of the retake-ops-demo command (main() returns its findings for tests)."""
    main()
    return 0


if __name__ == "__main__":
    cli()
