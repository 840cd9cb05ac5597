"""The main job runs end to end: synthetic video and a real file decoded with PyAV, through the
default tiny Qwen2-VL and the tiny model of every family (retake_ops.hf.tiny)."""
import re

import pytest
import torch

from retake_ops import demo
from retake_ops.hf import tiny


def test_synthetic_video_cuts_become_keyframes(tmp_path, capsys):
    result = demo.main(["--frames", "120", "--shots", "4", "--out", str(tmp_path), "--no-llm"])
    assert len(result["cuts"]) == 3
    assert set(result["cuts"]) <= set(result["keyframes"])  # hard cuts are distance peaks
    assert len(result["kept"]) == 30 and result["kept"] == sorted(result["kept"])
    png = tmp_path / "dpselect.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "cuts that became keyframes: 3/3" in capsys.readouterr().out


@pytest.mark.parametrize("colour, channel", [("red", 0), ("green", 1), ("blue", 2)])
def test_question_selects_spread_out_frames_of_that_colour(tmp_path, colour, channel):
    result = demo.main(["--frames", "150", "--shots", "6", "--select", "5", "--question",
                        f"Where is the {colour} scene?", "--out", str(tmp_path), "--no-llm"])
    video, _ = demo.synthetic_video(150, 6, seed=0)
    picked = video[result["selected"]].float().mean(dim=(1, 2))
    assert len(result["selected"]) == 5 and result["selected"] == sorted(result["selected"])
    assert (picked.argmax(dim=-1) == channel).all()  # every pick is from a shot of that colour
    # radius = 128 candidates // (4 * 5) = 6 candidate positions: picks lie more than 6 frames apart
    assert min(b - a for a, b in zip(result["selected"], result["selected"][1:])) > 6


def test_question_without_a_colour_needs_a_clip_model(tmp_path):
    with pytest.raises(ValueError, match="without --clip the demo scores questions that name exactly one of"):
        demo.main(["--frames", "40", "--question", "What happens?", "--out", str(tmp_path), "--no-llm"])


def test_video_file_is_decoded_with_pyav(tmp_path):
    av = pytest.importorskip("av")
    video, cuts = demo.synthetic_video(48, 3, seed=1)
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=24)
        stream.width, stream.height, stream.pix_fmt = demo.SIZE, demo.SIZE, "yuv420p"
        for frame in video.numpy():
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    decoded = demo.decode_video(str(path), max_frames=48)
    assert decoded.shape == (48, demo.SIZE, demo.SIZE, 3) and decoded.dtype == torch.uint8
    result = demo.main(["--video", str(path), "--out", str(tmp_path), "--no-llm"])
    assert result["cuts"] == [] and len(result["kept"]) == 12
    assert set(cuts) <= set(result["keyframes"])


def assert_memory_answered(result, out, max_new_tokens):
    """The video was encoded once and both questions answered on the memory and fresh, each printed with its
    times (never compared: timings are the machine's)."""
    memory = result["memory"]
    assert re.search(r"\n  video memory: encoded once \(handle.encode of the prompt up to the end of the video\) in "
                     r"\d+\.\d{3} s, \d+\.\d MiB of keys and values\n", out)
    assert memory["encode_seconds"] > 0 and memory["bytes"] > 0
    questions = memory["questions"]
    assert [q["ids"] for q in questions] == [list(ids) for ids in demo.TINY_QUESTIONS]
    for i, q in enumerate(questions):
        assert len(q["memory_answer"]) == len(q["fresh_answer"]) == max_new_tokens  # the memory answered
        assert q["memory_seconds"] > 0 and q["fresh_seconds"] > 0
        same = "as fresh" if q["memory_answer"] == q["fresh_answer"] else re.escape(f"fresh {q['fresh_answer']}")
        line = (rf"\n  question {i + 1} \({len(q['ids'])} tokens\): \d+\.\d{{3}} s on the memory vs \d+\.\d{{3}} s "
                rf"fresh \(\d+(\.\d)?x\); greedy tokens {re.escape(str(q['memory_answer']))} \({same}\)\n")
        assert re.search(line, out), line


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")  # a keyframe group: 16 tokens, a chunk keeps 12
def test_videollm_stage_runs_the_tiny_qwen2_vl_with_and_without_retake(tmp_path, capsys):
    result = demo.main(["--frames", "32", "--shots", "3", "--select", "0", "--out", str(tmp_path),
                        "--max-new-tokens", "2", "--chunk-frames", "4"])["videollm"]
    out = capsys.readouterr().out
    assert "a tiny Qwen2-VL with random weights, built from a config (no download)" in out
    assert result["groups"] == 16 and len(result["kept_groups"]) == 8  # frame_keep_ratio 0.5 of 16 groups
    assert set(result["keyframe_groups"]) <= set(result["kept_groups"])
    video_tokens = 16 * 16  # 112 x 112 frames: 8 x 8 patches, 2 x 2 merged, per temporal group of 2 frames
    assert result["tokens"] == video_tokens + 3 + 2 + 4  # prompt, <vision_start/end>, question
    assert all(held < result["tokens"] / 2 for held in result["held"])
    assert result["layers"] == list(range(8))
    assert_memory_answered(result, out, max_new_tokens=2)
    assert set(result["seconds"]) == set(result["peak"]) == {"plain", "retake"}
    assert all(v > 0 for v in result["peak"].values())
    assert (tmp_path / "videollm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # AdaReTaKe's budgets: 8 kept groups in chunks of 4 frames = 2 groups make 4 chunks.
    budgets = result["budgets"]
    assert "  temporal_budgets=True: 4 chunks, novelty d_c " in out and "(mean 0.40; 0.4 each without)" in out
    assert "  layer_budgets='adakv': a layer keeps " in out
    assert budgets["flat_ratios"] == [0.4] * 4 and sum(budgets["ratios"]) == pytest.approx(4 * 0.4)
    by_novelty = sorted(zip(budgets["novelty"], budgets["ratios"]))
    assert [r for _, r in by_novelty] == sorted(budgets["ratios"])  # more novel chunks keep more
    assert len(set(budgets["ratios"])) > 1
    assert budgets["layers"] == list(range(8)) and len(budgets["held"]) == 8
    assert all(len(row) == 8 and sum(row) % 8 == 0 for row in budgets["layer_kept"])  # layers x the even budget
    assert (tmp_path / "videollm_budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", list(tiny.BUILDERS))
def test_videollm_stage_runs_every_familys_tiny_model_with_and_without_retake(tmp_path, capsys, family):
    result = demo.main(["--family", family, "--frames", "16", "--shots", "2", "--select", "0", "--out", str(tmp_path),
                        "--max-new-tokens", "1"])["videollm"]
    out = capsys.readouterr().out
    assert f"VideoLLM: a tiny {family} (" in out
    assert "  temporal_budgets=True: 1 chunk, " in out and "  layer_budgets='adakv': a layer keeps " in out
    groups = 8 if family in tiny.QWEN else 16  # temporal groups of 2 frames; LLaVA-OneVision: frames
    assert result["groups"] == groups and len(result["kept_groups"]) == groups // 2
    assert set(result["keyframe_groups"]) <= set(result["kept_groups"])
    layout = tiny.make_inputs(family, tiny.make_videos(family, [groups]))  # the same tokens, random pixels
    assert result["tokens"] == layout["input_ids"].shape[1]
    assert len(result["held"]) == 2 and all(held < result["tokens"] for held in result["held"])
    assert result["layers"] == ([1, 3] if family in tiny.HYBRID_FAMILIES else [0, 1])  # the layers, not positions
    assert_memory_answered(result, out, max_new_tokens=1)
    assert (tmp_path / "videollm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(result["budgets"]["layers"]) == 2  # 2 layers; a hybrid's 2 full-attention layers of 4
    assert [len(row) for row in result["budgets"]["layer_kept"]] == [2]
    assert (tmp_path / "videollm_budgets.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("layers, total", [(list(range(8)), 8), ([1, 3], 4), (list(range(3, 48, 4)), 48),
                                           (list(range(80)), 80), (list(range(3, 128, 4)), 128)])
def test_the_kv_panel_names_its_bars_by_their_layers_without_overlapping_labels(layers, total):
    """Bar i is layer layers[i] (a hybrid's compressed layers are not 0, 1, ...): its tick says so; up to 12 bars
    every one is named, more are thinned, and no two labels overlap in the demo's figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6), gridspec_kw={"width_ratios": [3, 2, 2]})  # plot_videollm's
    try:
        demo.plot_held(axes[1], layers, [100] * len(layers), 300, total)
        fig.tight_layout()
        fig.canvas.draw()
        ticks = [t for t in axes[1].xaxis.get_major_ticks() if t.label1.get_visible() and t.label1.get_text()]
        named = {int(round(t.get_loc())): t.label1.get_text() for t in ticks}
        boxes = [t.label1.get_window_extent() for t in ticks]
    finally:
        plt.close(fig)
    assert named and all(label == str(layers[i]) for i, label in named.items())
    if len(layers) <= 12:
        assert sorted(named) == list(range(len(layers)))
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:]))
    assert ("full-attention layer" in axes[1].get_xlabel()) == (len(layers) < total)


def test_held_per_layer_names_the_compressed_layers():
    from retake_ops.hf.videollm import RetakeReport

    # A hybrid's 4 layers: 0 and 2 linear attention (None), 1 holds 3 tokens of 4 columns, 3 holds 2.
    positions = [None, torch.tensor([[0, 1, 3, -1]]), None, torch.tensor([[0, 3, -1, -1]])]
    assert demo.held_per_layer(RetakeReport([], positions, 0.0)) == ([1, 3], [3, 2])


@pytest.mark.parametrize("family", tiny.QWEN)
def test_the_default_video_length_writes_only_its_own_video_tokens(family):
    """The demo's 240 frames make 120 temporal groups: no group's timestamp may be a special token."""
    inputs = tiny.make_inputs(family, tiny.make_videos(family, [120]))
    assert int(tiny.video_mask(family, inputs["input_ids"]).sum()) == 120 * tiny.tokens_per_frame(family)


def test_the_demo_has_a_tiny_model_of_every_family_apply_retake_supports():
    from retake_ops.hf import MODEL_TYPE_TO_APPLY_FN

    assert set(tiny.BUILDERS) == set(MODEL_TYPE_TO_APPLY_FN)


def test_an_unknown_family_is_refused_naming_the_families(capsys):
    with pytest.raises(SystemExit):
        demo.main(["--family", "llama", "--no-llm"])
    assert f"--family 'llama': expected one of {', '.join(tiny.BUILDERS)}" in capsys.readouterr().err


def test_videollm_stage_loads_a_local_checkpoint(tmp_path, capsys):
    from retake_ops.hf.tiny import tiny_qwen2_vl

    folder = tmp_path / "ckpt"
    tiny_qwen2_vl(layers=2, hidden=128).save_pretrained(folder)
    result = demo.main(["--frames", "16", "--shots", "2", "--select", "0", "--out", str(tmp_path),
                        "--max-new-tokens", "1", "--model", str(folder)])["videollm"]
    assert f"VideoLLM: qwen2_vl from {folder}" in capsys.readouterr().out
    assert len(result["held"]) == 2


def test_videollm_stage_refuses_other_families(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=64)).save_pretrained(folder)
    with pytest.raises(ValueError, match=r"the demo runs Qwen2-VL and Qwen2.5-VL checkpoints .* got 'llama'"):
        demo.main(["--frames", "16", "--select", "0", "--out", str(tmp_path), "--model", str(folder)])
