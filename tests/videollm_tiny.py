"""The tests' name for retake_ops.hf.tiny, where the tiny VideoLLMs and their processor-shaped inputs
live (the demo runs them too): every test imports them from here."""
from retake_ops.hf.tiny import *  # noqa: F401,F403
