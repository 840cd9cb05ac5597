"""Every Python example in README.md and docs/*.md runs as written, in order, in one namespace per
file. The examples that start from a user's objects get tiny stand-ins: `model` and `inputs` (a
random-weight Qwen2-VL and processor-shaped inputs for a synthetic video) for the VideoLLM ones,
`clip_model` / `clip_processor` (a tiny random CLIP) for frame selection."""
import pathlib
import re

import pytest
import torch

import retake_ops
from tiny_clip import make_clip, make_processor

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def videollm():
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import tiny_qwen2_vl, video_inputs

    model = tiny_qwen2_vl(layers=2, hidden=128)
    video, _ = synthetic_video(64, 3, seed=0)
    return model, video_inputs(model, [video], [[5, 6, 7]], [[20, 21, 22, 23]])


def live_segments(model, count=4):
    """Processor-shaped outputs of a live video's pieces: each its own prompt piece with 16 frames."""
    from retake_ops.demo import synthetic_video
    from retake_ops.hf.tiny import video_inputs

    return [video_inputs(model, [synthetic_video(16, 1, seed=s)[0]], [[5 + s]], [[40 + s]]) for s in range(count)]


def run(path, namespace):
    blocks = python_blocks(path)
    for block in blocks:
        if block.lstrip().startswith(">>>"):
            continue  # interactive transcripts are checked by test_build's build_info tests
        exec(compile(block, str(path), "exec"), namespace)
    return blocks


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
def test_readme_examples_run(tmp_path):
    processor = make_processor(tmp_path)
    model, inputs = videollm()
    namespace = {"clip_processor": processor, "clip_model": make_clip(processor), "model": model, "inputs": inputs}
    first = python_blocks(README)[0]
    assert "apply_retake(model" in first, "the README opens with the one-line VideoLLM usage"
    exec(compile(first, str(README), "exec"), namespace)
    video = namespace["video"]
    assert video.frames == 32 and len(video.kept_frames) == retake_ops.target_frames(32, 0.5)
    assert namespace["answer"].shape == (1, inputs["input_ids"].shape[1] + 64)
    assert not hasattr(model.forward, "_retake_handle")  # the with block removed the patch

    blocks = run(README, namespace)
    assert len(blocks) >= 5
    assert namespace["idx"].shape == (2, 60) and namespace["keyframes"].dim() == 1
    assert namespace["k2"].shape == (1, 4, 128, 128) and namespace["keep_idx"].shape == (1, 128)
    assert namespace["pivot_mask"][0, namespace["keep_idx"][0]].sum() == 16  # every pivot kept
    assert len(namespace["sel"].indices) == 16 and namespace["sel"].frames.shape == (16, 224, 224, 3)
    assert torch.equal(namespace["sel"].indices, namespace["sel"].indices.sort().values)
    # generate() fed the last prompt token and 15 of its 16 new ones through the compressed cache
    assert namespace["out"].shape == (1, 1025 + 16) and namespace["cache"].get_seq_length() == 1025 + 15


@pytest.mark.filterwarnings("ignore:PivotKV. pivot tokens outnumber")
@pytest.mark.parametrize("doc", sorted((ROOT / "docs").glob("*.md")), ids=lambda p: p.name)
def test_docs_examples_run(doc, tmp_path):
    model, inputs = videollm()
    namespace = {"model": model, "inputs": inputs, "segments": live_segments(model)}
    run(doc, namespace)
    if doc.name == "videollm.md":  # the live stream stayed within its budget, and answered
        assert 0 < namespace["held"] <= 64 and namespace["answer"].shape[0] == 1
