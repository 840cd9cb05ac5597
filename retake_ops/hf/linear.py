"""Linear-attention layers of hybrid decoders (Qwen3.5's gated delta net) in PivotKV prefills.

A hybrid decoder runs linear-attention layers, whose whole past is a recurrent state and a short
convolution window, beside full-attention layers, whose keys PivotKV evicts. Nothing is evicted
from a recurrent state; what a prefill forward must get right is what enters it, so that after all
chunks it is the state one unchunked pass over the same tokens leaves:
- Padding inside a row's sequence is not a no-op for a recurrence: the state decays at a padded
  step too, and the convolution window would read zeros in place of the row's previous tokens.
  A planned forward pads rows that are aligned chunk by chunk; when it holds padding and the
  layer already has a state, each row runs alone on its real tokens. (The first forward of a
  prefill runs as the model runs a left-padded batch: every row's padding comes before its first
  token, where it leaves the empty state empty.)
- The question probe (trailing tokens that score a chunk and are then dropped) runs from the
  state the chunk left, and the state is put back afterwards: the probe never advances it.

- A plain forward with padding among its new tokens (a batch of questions of different lengths
  after a VideoMemory, the padding between the memory and each question) runs each row alone on
  its real tokens too, once the layer has a state.

`LinearSwitch` replaces the forward of each linear-attention module while the PivotKV attention is
on (retake_ops.hf.attention): outside those forwards it only takes the PivotKV step argument
away, which the module would otherwise pass on to its kernels.
"""
from __future__ import annotations

import torch

from . import _compat


def _linear_forward(module, original, step_kwarg: str):
    def forward(*args, **kwargs):
        step = kwargs.pop(step_kwarg, None)
        plan = None if step is None else step.plan
        if plan is None and (step is None or step.new_valid is None):
            return original(*args, **kwargs)
        if "hidden_states" in kwargs:
            hidden = kwargs.pop("hidden_states")
        else:
            hidden, args = args[0], args[1:]
        layer = _compat.linear_cache(kwargs).layers[module.layer_idx]
        if plan is None:  # a plain forward with padding among its tokens
            valid, probe = step.new_valid.to(hidden.device), 0
        else:
            plan = plan.on(hidden.device)
            valid, probe = plan.valid, plan.probe
        n = hidden.shape[1] - probe
        if valid is not None and step.host_valid is None:  # read back once per forward, not per layer
            step.host_valid = valid[:, :n].cpu()

        def run(x, mask=None):
            return original(x, *args, **dict(kwargs, attention_mask=mask))

        if valid is None or bool(step.host_valid.all()):
            out = run(hidden[:, :n])
        elif not _compat.linear_started(layer):
            out = run(hidden[:, :n], valid[:, :n].long())
        else:
            out = hidden.new_zeros(hidden.shape[0], n, hidden.shape[2])
            for row in range(hidden.shape[0]):
                cols = torch.nonzero(step.host_valid[row]).flatten().to(hidden.device)
                if cols.numel():
                    with _compat.linear_row(layer, row):
                        out[row, cols] = run(hidden[row:row + 1, cols])[0]
        if not probe:
            return out
        states = _compat.linear_states(layer)
        saved = [t.clone() for t in states]
        probe = run(hidden[:, n:])
        for t, s in zip(states, saved):
            t.copy_(s)
        return torch.cat([out, probe], dim=1)

    return forward


class LinearSwitch:
    """The PivotKV forwards of a hybrid model's linear-attention modules, until remove()."""

    def __init__(self, model, step_kwarg: str):
        self.modules = _compat.linear_attention_modules(model)
        self.previous = []  # each module's own forward attribute (e.g. accelerate's hook), None if it had none
        for module in self.modules:
            self.previous.append(module.__dict__.get("forward"))
            module.forward = _linear_forward(module, module.forward, step_kwarg)

    def remove(self) -> None:
        for module, previous in zip(self.modules, self.previous):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self.modules, self.previous = [], []
