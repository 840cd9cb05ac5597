"""A tiny random-weight CLIP and its processor, built offline from local files."""
import json
import pathlib

import torch
import transformers
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

# The PIL image processor needs no torchvision; older transformers name it CLIPImageProcessor.
ImageProcessor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
LETTERS = "abcdefghijklmnopqrstuvwxyz?"


def make_processor(d: pathlib.Path):
    """A CLIP processor built from local files in folder d: a letter-level BPE vocabulary
    without merges and a 32x32 image processor."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(d))
    images = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def tiny_towers(vocab_size: int) -> tuple[dict, dict]:
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2)
    return text, vision


def make_clip(processor):
    torch.manual_seed(0)
    text, vision = tiny_towers(len(processor.tokenizer))
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
