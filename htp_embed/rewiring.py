"""Forward hooks that rewire hidden states between layers and stop the forward pass early.

Hooks on the decoder layers of any transformers decoder (Llama, Qwen2/3, Mistral, Gemma 2/3):
no modeling file is copied, so new transformers releases keep working.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


class EarlyExit(Exception):  # noqa: N818 - control flow, not an error
    """Raised by the exit hook to abandon the rest of the forward pass."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("early exit")
        self.hidden = hidden


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    # transformers 5 passes hidden_states positionally; older releases and some models by name.
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def rewired(
    layers: Sequence[torch.nn.Module],
    rewire: range,
    src: torch.Tensor | None,
    dst: torch.Tensor | None,
    exit_after: int | None,
) -> Iterator[None]:
    """Within the block, copy ``hidden[b, src[b, i]]`` to ``hidden[b, dst[b, i]]`` before every
    layer in ``rewire`` (one gather and one scatter for the whole batch), and raise
    :class:`EarlyExit` with the output of layer ``exit_after`` (0-based) so that no later layer
    runs.

    The copy is in place on the layer's input: it is the tensor the layer reads both for
    attention and for its residual, exactly as if the placeholder had held that state.
    """
    handles = []
    if src is not None and dst is not None and src.numel() and len(rewire):
        rows = torch.arange(src.shape[0], device=src.device).unsqueeze(1).expand_as(src)

        def copy_summaries(module, args, kwargs):
            hidden = _hidden_of(args, kwargs)
            hidden[rows, dst] = hidden[rows, src]

        for index in rewire:
            handles.append(layers[index].register_forward_pre_hook(copy_summaries, with_kwargs=True))

    if exit_after is not None:

        def stop(module, args, output):
            raise EarlyExit(output[0] if isinstance(output, tuple) else output)

        handles.append(layers[exit_after].register_forward_hook(stop))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
