"""Prefill of a Qwen2-VL-shaped model on a video, with and without ReTaKe, vs the number of frames;
and a VideoMemory (RetakeHandle.encode / extend): many questions on one encoded video, its file,
and a live stream under a budget.

Model: retake_ops.hf.tiny.tiny_qwen2_vl (random weights, 8 layers, hidden 512, 8 query / 2 KV
heads, a 2-block vision tower, 14-pixel patches, 2 x 2 merging, 2-frame temporal groups), fp32,
sdpa, CPU-sized, with the language model most of the cost as in a real VideoLLM. Video: the demo's synthetic shots at 112 x 112 (16 tokens per temporal group).
Variants:
  plain            the unpatched model, one forward over the whole prompt (logits of the last token)
  retake           apply_retake(frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=32): DPSelect, then
                   a chunked prefill with question-guided PivotKV
  retake+temporal  retake with temporal_budgets=True: per-chunk keep ratios from the video's novelty
  retake+adakv     retake with layer_budgets="adakv": per-layer budgets from the pooled scores, each chunk
                   evicted once the last layer has scored it
  retake+both      retake with both options
All include the vision tower. extra_info: peak_alloc_bytes (the most bytes the prefill had
allocated at once on top of the model, from a separate untimed run), video_tokens, held_tokens
(per layer, after the prefill).

VideoMemory (the same model and ReTaKe config with question_guided=False, under which an answer on
the memory is the fresh answer; the video REUSE_FRAMES frames at REUSE_SIZE x REUSE_SIZE, 64
tokens per temporal group, so that its prefill dominates as on a real VideoLLM):
  reuse     5 questions of 4 to 12 tokens, NEW_TOKENS greedy tokens each: one encode and 5 generate()
            calls on memory.question_inputs([q]) (`memory`), one encode and one generate() on
            memory.question_inputs of all 5 (`batched`), against 5 generate() calls on prompt and
            question with the same patch (`fresh`); extra_info: encode and per-question seconds of
            the last round, whether the answers equal the fresh ones
  save/load memory.save(verbose=False) to a file and load_memory; extra_info: file bytes, nbytes()
            (held keys and values), held slots
  stream    a live video: encode of a first segment, then handle.extend per segment (each its own
            prompt piece and STREAM_FRAMES frames of one synthetic video) on tiny_qwen2_vl's default
            size (4 layers, hidden 256), under a budget (kv_keep_ratio=None, max_kv_tokens=STREAM_BUDGET:
            `bounded`) and without one (kv_keep_ratio=0.25: `unbounded`); extra_info: the peak over the
            stream of the KV storage allocated (the layers' capacity buffers _k and _v) and of the held
            slots, the video tokens each layer holds at the end
The script mode (--memory) takes every time best-of --repeats (a stream's: of at most 3 runs), the
batched call on the memory the 5 questions ran on; it runs the reuse for each video of REUSE_SWEEP
(128 and 256 frames: the speedup grows with what the prefill costs against a question, NEW_TOKENS
decoding steps) and a STREAM_SEGMENTS-segment stream. The pytest-benchmark tests time the
REUSE_FRAMES-frame video and a STREAM_SEGMENTS_TIMED-segment stream.

    make bench PYTEST_ARGS='-k hf_videollm'                          # pytest-benchmark table
    python benchmarks/bench_hf_videollm.py --out docs/videollm_prefill   # the sweep, a plot and a table
    python benchmarks/bench_hf_videollm.py --memory --out docs/videollm_memory  # VideoMemory: JSON, table
"""
import argparse
import contextlib
import json
import pathlib
import platform
import tempfile
import time
import warnings

import pytest
import torch

FRAMES = [32, 64, 128, 256]
CONFIG = dict(frame_keep_ratio=0.5, kv_keep_ratio=0.25, chunk_frames=32, window=9)
# Variant -> the RetakeConfig fields it sets on top of CONFIG (None: the unpatched model).
VARIANTS = {
    "plain": None,
    "retake": {},
    "retake+temporal": dict(temporal_budgets=True),
    "retake+adakv": dict(layer_budgets="adakv"),
    "retake+both": dict(temporal_budgets=True, layer_budgets="adakv"),
}
STYLES = {"plain": "ko--", "retake": "s-", "retake+temporal": "^-", "retake+adakv": "v-", "retake+both": "D-"}


def build():
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl(layers=8, hidden=512)
    videos = {n: synthetic_video(n, max(1, n // 24), seed=0)[0] for n in FRAMES}
    return model, videos


def inputs_for(model, video):
    from retake_ops.hf.tiny import video_inputs

    return video_inputs(model, [video], [[5, 6, 7]], [[20, 21, 22, 23]], size=112)


def prefill(model, inputs, variant):
    """One prefill; returns the held KV tokens per layer (plain: every token)."""
    from retake_ops.hf import apply_retake

    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PivotKV: pivot tokens outnumber")
        if VARIANTS[variant] is None:
            model(**inputs, logits_to_keep=1)
            return [int(inputs["attention_mask"].sum())] * model.config.text_config.num_hidden_layers
        with apply_retake(model, **CONFIG, **VARIANTS[variant]) as handle:
            model(**inputs, logits_to_keep=1)
        return [int(h[0]) for h in handle.report.held_tokens()]


@pytest.fixture(scope="module")
def setup():
    return build()


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_videollm_prefill(benchmark, setup, variant, frames):
    from retake_ops._measure import peak_bytes

    model, videos = setup
    inputs = inputs_for(model, videos[frames])
    benchmark.group = f"hf_videollm prefill, {frames} frames"
    held = benchmark.pedantic(prefill, args=(model, inputs, variant), rounds=2, iterations=1, warmup_rounds=1)
    benchmark.extra_info["peak_alloc_bytes"] = peak_bytes(lambda: prefill(model, inputs, variant), "cpu")[1]
    benchmark.extra_info["video_tokens"] = int((inputs["input_ids"] == model.config.video_token_id).sum())
    benchmark.extra_info["held_tokens"] = held


def sweep(repeats: int) -> list[dict]:
    """Every (frames, variant): best-of-`repeats` prefill seconds, peak bytes, tokens.

    A frame count's variants are timed in turn, one run each per round, so that a slow spell of
    the machine falls on all of them rather than on one: their differences are a few percent."""
    from retake_ops._measure import peak_bytes

    model, videos = build()
    rows = []
    for frames in FRAMES:
        inputs = inputs_for(model, videos[frames])
        held = {variant: prefill(model, inputs, variant) for variant in VARIANTS}  # warm-up
        seconds = {variant: [] for variant in VARIANTS}
        for _ in range(repeats):
            for variant in VARIANTS:
                start = time.perf_counter()
                prefill(model, inputs, variant)
                seconds[variant].append(time.perf_counter() - start)
        for variant in VARIANTS:
            _, peak = peak_bytes(lambda: prefill(model, inputs, variant), "cpu")
            rows.append(dict(frames=frames, variant=variant, seconds=min(seconds[variant]), peak_bytes=peak,
                             tokens=int(inputs["attention_mask"].sum()), held_tokens=held[variant]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def plot(rows: list[dict], path: pathlib.Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(15, 4))
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        frames = [r["frames"] for r in sel]
        # Hollow markers of different shapes: the ReTaKe variants' memory and tokens coincide.
        style = dict(fillstyle="none", label=variant)
        ax.plot(frames, [r["seconds"] for r in sel], STYLES[variant], **style)
        bx.plot(frames, [r["peak_bytes"] / 2**20 for r in sel], STYLES[variant], **style)
        cx.plot(frames, [sum(r["held_tokens"]) / len(r["held_tokens"]) for r in sel], STYLES[variant], **style)
    for axis, title, unit in ((ax, "prefill time", "seconds"), (bx, "peak memory above the model", "MiB"),
                              (cx, "KV tokens held per layer (mean over layers)", "tokens")):
        axis.set_title(title)
        axis.set_xlabel("video frames")
        axis.set_ylabel(unit)
        axis.set_xscale("log", base=2)
    ax.legend()
    fig.suptitle(note, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# VideoMemory: many questions on one encoded video, its file, a live stream under a budget.
# ---------------------------------------------------------------------------------------
REUSE_FRAMES, REUSE_SIZE = 128, 224
REUSE_SWEEP = (REUSE_FRAMES, 256)  # the script mode's videos (the tests': REUSE_FRAMES)
REUSE_CONFIG = dict(CONFIG, question_guided=False)  # an answer on the memory is then the fresh answer
PROMPT, TRAILER = [5, 6, 7], [30]  # the text before the video and after it (the end of the encoded prompt)
QUESTIONS = [[100 + 16 * i + j for j in range(n)] for i, n in enumerate((4, 6, 8, 10, 12))]
NEW_TOKENS = 8
STREAM_SEGMENTS, STREAM_SEGMENTS_TIMED, STREAM_FRAMES, STREAM_BUDGET = 50, 10, 8, 64
# Stream -> its RetakeConfig fields: CONFIG with a budget, and CONFIG as is.
STREAMS = {"bounded": dict(CONFIG, kv_keep_ratio=None, max_kv_tokens=STREAM_BUDGET), "unbounded": dict(CONFIG)}


@contextlib.contextmanager
def quiet():
    """no_grad, and no warning of pivots outnumbering a chunk's budget (expected at these ratios)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PivotKV: pivot tokens outnumber")
        yield


def reuse_inputs(model, video):
    """(the prompt to encode: text, video, TRAILER; per question, the fresh prompt: ..., TRAILER, question)."""
    from retake_ops.hf.tiny import video_inputs

    def prompt(after):
        return video_inputs(model, [video], [PROMPT], [TRAILER + after], size=REUSE_SIZE)

    return prompt([]), [prompt(q) for q in QUESTIONS]


def answer(model, inputs):
    """NEW_TOKENS greedy tokens per row."""
    return model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[:, -NEW_TOKENS:]


def on_memory(model, handle, prompt, single=True, batched=False):
    """One encode, then QUESTIONS on it: one generate() each (single), then one for all (batched), on the same
    memory: (the memory, {"single" / "batched": the answers}, seconds)."""
    answers = {}
    with quiet():
        start = time.perf_counter()
        memory = handle.encode(**prompt)
        seconds = dict(encode=time.perf_counter() - start)
        if single:
            answers["single"], seconds["questions"] = [], []
            for question in QUESTIONS:
                start = time.perf_counter()
                answers["single"].append(answer(model, memory.question_inputs([question])))
                seconds["questions"].append(time.perf_counter() - start)
        if batched:
            start = time.perf_counter()
            answers["batched"] = list(answer(model, memory.question_inputs(QUESTIONS)).split(1))
            seconds["batch"] = time.perf_counter() - start
    return memory, answers, seconds


def fresh(model, prompts):
    """One generate() per question on its whole prompt, video included: (answers, seconds)."""
    answers, seconds = [], []
    with quiet():
        for inputs in prompts:
            start = time.perf_counter()
            answers.append(answer(model, inputs))
            seconds.append(time.perf_counter() - start)
    return answers, seconds


def encoded(model, video):
    """A memory of the reuse video (the patch removed again)."""
    from retake_ops.hf import apply_retake

    prompt, _ = reuse_inputs(model, video)
    with apply_retake(model, **REUSE_CONFIG) as handle, quiet():
        return handle.encode(**prompt)


def kv_storage(memory) -> int:
    """Bytes of the keys' and values' capacity buffers of every layer (what is allocated, held or not)."""
    return sum(layer._k.nbytes + layer._v.nbytes for layer in memory.kv_layers if layer._k is not None)


def video_held(memory, video_token_id) -> list[int]:
    """Per layer, the video tokens row 0 holds: the held input_ids columns (the latest report) that are video."""
    ids = memory.input_ids[0]
    return [int((ids[p[p >= 0]] == video_token_id).sum()) for p in
            (positions[0] for positions in memory.report.positions if positions is not None)]


def stream_segments(model, segments):
    """Per segment, its own prompt piece ([5 + s], <|vision_start|>, its frames, <|vision_end|>, [40 + s]) with
    STREAM_FRAMES consecutive frames of one synthetic video (a shot every 24 frames)."""
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import video_inputs

    video = synthetic_video(segments * STREAM_FRAMES, max(1, segments * STREAM_FRAMES // 24), seed=1)[0]
    return [video_inputs(model, [video[s * STREAM_FRAMES:(s + 1) * STREAM_FRAMES]], [[5 + s]], [[40 + s]])
            for s in range(segments)]


def stream(model, segments, variant):
    """encode the first segment, extend by the others: the memory and, per segment, the KV storage allocated
    and the held slots after it."""
    from retake_ops.hf import apply_retake

    storage, held = [], []

    def note(memory):
        storage.append(kv_storage(memory))
        held.append(memory.held_slots())

    with apply_retake(model, **STREAMS[variant]) as handle, quiet():
        memory = handle.encode(**segments[0])
        note(memory)
        for segment in segments[1:]:
            note(handle.extend(memory, **segment))
    return memory, storage, held


def stream_figures(model, memory, storage, held) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        size = memory.save(pathlib.Path(tmp) / "stream.safetensors", verbose=False)
    return dict(peak_kv_storage_bytes=max(storage), peak_held_slots=max(held), final_kv_storage_bytes=storage[-1],
                final_held_slots=held[-1], final_nbytes=memory.nbytes(), file_bytes=size,
                final_video_tokens=video_held(memory, model.config.video_token_id),
                text_tokens=int(memory.attention_mask.sum() - (memory.input_ids == model.config.video_token_id).sum()))


@pytest.fixture(scope="module")
def reuse_setup(setup):
    """The model, the reuse video, its memory and the fresh answers to QUESTIONS."""
    from retake_ops.demo import synthetic_video
    from retake_ops.hf import apply_retake

    model, _ = setup
    video = synthetic_video(REUSE_FRAMES, max(1, REUSE_FRAMES // 24), seed=0)[0]
    with apply_retake(model, **REUSE_CONFIG):
        want, _ = fresh(model, reuse_inputs(model, video)[1])
    return model, video, encoded(model, video), want


@pytest.mark.parametrize("mode", ["memory", "batched", "fresh"])
def test_hf_videollm_reuse(benchmark, reuse_setup, mode):
    from retake_ops.hf import apply_retake

    model, video, memory, want = reuse_setup
    prompt, prompts = reuse_inputs(model, video)
    benchmark.group = (f"hf_videollm VideoMemory: {len(QUESTIONS)} questions on a {REUSE_FRAMES}-frame video "
                       f"({NEW_TOKENS} new tokens each)")
    with apply_retake(model, **REUSE_CONFIG) as handle:
        if mode == "fresh":
            answers, seconds = benchmark.pedantic(fresh, args=(model, prompts), rounds=2, iterations=1,
                                                  warmup_rounds=1)
            benchmark.extra_info["question_seconds"] = seconds
        else:
            _, answers, seconds = benchmark.pedantic(on_memory, args=(model, handle, prompt, mode == "memory",
                                                                      mode == "batched"),
                                                     rounds=2, iterations=1, warmup_rounds=1)
            answers = next(iter(answers.values()))
            benchmark.extra_info.update({f"{k}_seconds": v for k, v in seconds.items()})
    benchmark.extra_info["same_answers_as_fresh"] = all(torch.equal(a, b) for a, b in zip(answers, want))
    benchmark.extra_info["video_tokens"] = int((prompt["input_ids"] == model.config.video_token_id).sum())
    benchmark.extra_info["held_slots"] = memory.held_slots()


@pytest.mark.parametrize("step", ["save", "load"])
def test_hf_videollm_memory_file(benchmark, reuse_setup, step, tmp_path):
    from retake_ops.hf import apply_retake, load_memory

    model, _, memory, _ = reuse_setup
    path = tmp_path / "video.safetensors"
    benchmark.group = f"hf_videollm VideoMemory file, {REUSE_FRAMES}-frame video"
    size = memory.save(path, verbose=False)
    if step == "save":
        benchmark.pedantic(memory.save, args=(path,), kwargs=dict(verbose=False), rounds=5, iterations=1,
                           warmup_rounds=1)
    else:
        with apply_retake(model, **REUSE_CONFIG):
            benchmark.pedantic(load_memory, args=(path, model), rounds=5, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(file_bytes=size, nbytes=memory.nbytes(), held_slots=memory.held_slots(),
                                kv_storage_bytes=kv_storage(memory))


@pytest.fixture(scope="module")
def stream_setup():
    from retake_ops.hf.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl()
    return model, stream_segments(model, STREAM_SEGMENTS_TIMED)


@pytest.mark.parametrize("variant", list(STREAMS))
def test_hf_videollm_stream(benchmark, stream_setup, variant):
    model, segments = stream_setup
    benchmark.group = f"hf_videollm VideoMemory: a {len(segments)}-segment live stream"
    memory, storage, held = benchmark.pedantic(stream, args=(model, segments, variant), rounds=2, iterations=1,
                                               warmup_rounds=1)
    benchmark.extra_info.update(stream_figures(model, memory, storage, held))


def reuse_figures(model, frames: int, repeats: int):
    """QUESTIONS on a memory of a `frames`-frame video, one call each and then one batched call on the same
    memory, vs fresh generate() calls: (the figures, the memory). Every time is the fastest of `repeats` runs,
    the memory and fresh runs taken in turn, so that a slow spell of the machine falls on both."""
    from retake_ops.demo import synthetic_video
    from retake_ops.hf import apply_retake

    video = synthetic_video(frames, max(1, frames // 24), seed=0)[0]
    prompt, prompts = reuse_inputs(model, video)
    runs = {"memory": [], "fresh": []}
    with apply_retake(model, **REUSE_CONFIG) as handle:
        on_memory(model, handle, prompt, batched=True)  # warm-up
        for _ in range(repeats):
            memory, got, seconds = on_memory(model, handle, prompt, batched=True)
            runs["memory"].append(seconds)
            want, seconds = fresh(model, prompts)
            runs["fresh"].append(seconds)
            print(json.dumps(dict(frames=frames, **{k: v[-1] for k, v in runs.items()})), flush=True)
    encode = min(r["encode"] for r in runs["memory"])
    per_question = [min(r["questions"][i] for r in runs["memory"]) for i in range(len(QUESTIONS))]
    per_fresh = [min(r[i] for r in runs["fresh"]) for i in range(len(QUESTIONS))]
    batch_call = min(r["batch"] for r in runs["memory"])
    return dict(frames=frames, size=REUSE_SIZE, prompt_tokens=int(prompt["attention_mask"].sum()),
                video_tokens=int((prompt["input_ids"] == model.config.video_token_id).sum()),
                held_slots=memory.held_slots(), question_tokens=[len(q) for q in QUESTIONS], new_tokens=NEW_TOKENS,
                encode_seconds=encode, question_seconds=per_question, memory_total_seconds=encode + sum(per_question),
                fresh_seconds=per_fresh, fresh_total_seconds=sum(per_fresh),
                speedup=sum(per_fresh) / (encode + sum(per_question)), batched_call_seconds=batch_call,
                batched_total_seconds=encode + batch_call, batched_speedup=sum(per_fresh) / (encode + batch_call),
                same_answers=all(torch.equal(a, b) for a, b in zip(got["single"], want)),
                same_answers_batched=all(torch.equal(a, b) for a, b in zip(got["batched"], want))), memory


def memory_figures(repeats: int) -> dict:
    """Reuse (REUSE_SWEEP frames), file (the REUSE_FRAMES-frame memory) and stream figures; every time the
    fastest of `repeats` runs."""
    from retake_ops.hf import apply_retake, load_memory
    from retake_ops.hf.tiny import tiny_qwen2_vl

    model = tiny_qwen2_vl(layers=8, hidden=512)
    reuse = []
    for frames in REUSE_SWEEP:
        row, encoded_memory = reuse_figures(model, frames, repeats)
        reuse.append(row)
        print(json.dumps(row), flush=True)
        if frames == REUSE_FRAMES:
            memory = encoded_memory

    saves, loads = [], []
    with tempfile.TemporaryDirectory() as tmp, apply_retake(model, **REUSE_CONFIG):
        path = pathlib.Path(tmp) / "video.safetensors"
        memory.save(path, verbose=False)
        load_memory(path, model)  # warm-up
        for _ in range(max(repeats, 5)):
            start = time.perf_counter()
            size = memory.save(path, verbose=False)
            saves.append(time.perf_counter() - start)
            start = time.perf_counter()
            load_memory(path, model)
            loads.append(time.perf_counter() - start)
    file = dict(frames=REUSE_FRAMES, save_seconds=min(saves), load_seconds=min(loads), file_bytes=size,
                nbytes=memory.nbytes(), held_slots=memory.held_slots(), kv_storage_bytes=kv_storage(memory))
    print(json.dumps(file), flush=True)

    small = tiny_qwen2_vl()
    segments = stream_segments(small, STREAM_SEGMENTS)
    streams = {}
    for variant in STREAMS:
        seconds = []
        for _ in range(min(repeats, 3)):  # the figures are the same every run; only its time varies
            start = time.perf_counter()
            memory, storage, held = stream(small, segments, variant)
            seconds.append(time.perf_counter() - start)
        streams[variant] = dict(config=STREAMS[variant], seconds=min(seconds),
                                **stream_figures(small, memory, storage, held), kv_storage_bytes=storage,
                                held_slots=held)
        print(json.dumps({k: v for k, v in streams[variant].items() if not isinstance(v, list)}), flush=True)
    stream_info = dict(segments=STREAM_SEGMENTS, frames_per_segment=STREAM_FRAMES,
                       video_tokens_per_segment=int((segments[0]["input_ids"] == small.config.video_token_id).sum()),
                       text_tokens_per_segment=int((segments[0]["input_ids"] != small.config.video_token_id).sum()),
                       layers=small.config.text_config.num_hidden_layers, hidden=small.config.text_config.hidden_size)
    return dict(reuse=reuse, file=file, stream=dict(stream_info, variants=streams))


def memory_table(figures: dict) -> str:
    """The figures as markdown tables."""
    r, f, s = figures["reuse"], figures["file"], figures["stream"]

    def ms(x):
        return f"{1000 * x:.0f} ms"

    first = r[0]
    lines = [f"Reuse: {len(first['question_tokens'])} questions ({', '.join(map(str, first['question_tokens']))} "
             f"tokens, {first['new_tokens']} new tokens each) on one encoded video, against fresh generate() calls on "
             f"prompt and question ({first['size']} x {first['size']} frames)", "",
             "| frames | video tokens | encode s | per question s | encode + questions s | fresh s | speedup "
             "| encode + one batched call s | batched speedup | same answers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r:
        lines.append(f"| {row['frames']} | {row['video_tokens']} | {row['encode_seconds']:.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in row['question_seconds'])} | {row['memory_total_seconds']:.3f} | "
                     f"{row['fresh_total_seconds']:.3f} | {row['speedup']:.2f}x | {row['batched_total_seconds']:.3f} | "
                     f"{row['batched_speedup']:.2f}x | {row['same_answers'] and row['same_answers_batched']} |")
    lines += ["",
              "| file | save | load | file bytes | nbytes() | held slots (sum over layers) | KV storage allocated |",
              "| --- | --- | --- | --- | --- | --- | --- |",
              f"| {f['frames']}-frame memory | {ms(f['save_seconds'])} | {ms(f['load_seconds'])} | {f['file_bytes']} | "
              f"{f['nbytes']} | {f['held_slots']} | {f['kv_storage_bytes']} |", "",
              f"Live stream: {s['segments']} segments of {s['frames_per_segment']} frames "
              f"({s['video_tokens_per_segment']} video and {s['text_tokens_per_segment']} text tokens each), "
              f"{s['layers']} layers of hidden {s['hidden']}",
              "",
              "| stream | peak KV storage bytes | peak held slots | final held slots | final video tokens per layer "
              "| text tokens | nbytes() | file bytes | seconds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, v in s["variants"].items():
        budget = (f"max_kv_tokens={v['config']['max_kv_tokens']}" if v["config"].get("max_kv_tokens") is not None
                  else f"kv_keep_ratio={v['config']['kv_keep_ratio']}")
        tokens = sorted(set(v["final_video_tokens"]))
        lines.append(f"| {name} ({budget}) | {v['peak_kv_storage_bytes']} | {v['peak_held_slots']} | "
                     f"{v['final_held_slots']} | {' to '.join(map(str, tokens))} | {v['text_tokens']} | "
                     f"{v['final_nbytes']} | {v['file_bytes']} | {v['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="path prefix of what is written: the sweep's .png and .json "
                    "(default docs/videollm_prefill), with --memory a .json (default docs/videollm_memory)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per point (the fastest counts)")
    ap.add_argument("--memory", action="store_true", help="VideoMemory instead of the prefill sweep: questions on "
                    "one encoded video vs fresh generate() calls, save and load, a live stream with and without a "
                    "budget")
    args = ap.parse_args()
    note = (f"Qwen2-VL-shaped random model (8 layers, hidden 512), fp32 CPU, {platform.processor() or 'cpu'}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; ReTaKe {CONFIG}")
    if args.memory:
        figures = memory_figures(args.repeats)
        note = note.replace("; ReTaKe", f"; best of {args.repeats}; ReTaKe") + (
            f"; reuse: question_guided=False; stream: {figures['stream']['layers']} layers, hidden "
            f"{figures['stream']['hidden']}")
        out = pathlib.Path(args.out or "docs/videollm_memory").with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"note": note, **figures}, indent=1) + "\n")
        print(memory_table(figures))
        print(f"wrote {out}")
        return
    rows = sweep(args.repeats)
    out = pathlib.Path(args.out or "docs/videollm_prefill")
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(rows, out.with_suffix(".png"), note)
    out.with_suffix(".json").write_text(json.dumps({"note": note, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out.with_suffix('.png')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
