"""Every Python example in README.md runs as written (the frame-selection example gets a
tiny random CLIP for its `clip_model` / `clip_processor`), in order, in one namespace."""
import pathlib
import re

import torch

from tiny_clip import make_clip, make_processor

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_examples_run(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 3
    processor = make_processor(tmp_path)
    namespace = {"clip_processor": processor, "clip_model": make_clip(processor)}
    for block in blocks:
        if block.lstrip().startswith(">>>"):
            continue  # interactive transcripts are checked by test_build's build_info tests
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["idx"].shape == (2, 60) and namespace["keyframes"].dim() == 1
    assert namespace["k2"].shape == (1, 4, 128, 128) and namespace["keep_idx"].shape == (1, 128)
    assert namespace["pivot_mask"][0, namespace["keep_idx"][0]].sum() == 16  # every pivot kept
    assert len(namespace["sel"].indices) == 16 and namespace["sel"].frames.shape == (16, 224, 224, 3)
    assert torch.equal(namespace["sel"].indices, namespace["sel"].indices.sort().values)
    # generate() fed the last prompt token and 15 of its 16 new ones through the compressed cache
    assert namespace["out"].shape == (1, 1025 + 16) and namespace["cache"].get_seq_length() == 1025 + 15
