"""Text from a text checkpoint: generation, optionally after a prompt.

The codec (UTF-8 bytes, the NUL end token) is the text task's own
(:mod:`reptile_gen.data.text`).
"""

from __future__ import annotations

import torch

from reptile_gen.data.text import END_TOKEN, decode_text, encode_text
from reptile_gen.sampling.checks import SamplingError, check_num_samples, check_task_kind
from reptile_gen.sampling.online import OnlineSampler

__all__ = ["decode_text", "encode_prompt", "generate_text"]


def encode_prompt(prompt: str, max_len: int) -> list[int]:
    """The UTF-8 bytes of ``prompt``; a clear error if it cannot fit before the end token."""
    data = encode_text(prompt)
    if END_TOKEN in data:
        raise SamplingError("prompt contains a NUL byte: NUL is the end token of a text")
    if len(data) > max_len - 1:
        raise SamplingError(
            f"prompt is {len(data)} bytes long but the model's max_len is {max_len}: a "
            f"prompt may have at most max_len - 1 = {max_len - 1} bytes (one position is "
            "left for the end token); shorten the prompt"
        )
    return data


def _text_max_len(module) -> int:
    check_task_kind(module, "text", "text")
    return int(module.task_spec.input_sizes[0])


def generate_text(
    module,
    num_samples: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    prompt: str = "",
    path: str = "auto",
) -> list[str]:
    """``num_samples`` texts from a text checkpoint, each starting with ``prompt``.

    The prompt's bytes are fed first at positions ``0..len-1`` (teacher-forced, exactly
    like training), then bytes are drawn until the end token (NUL) or ``max_len``. The
    returned texts include the prompt. ``path``: the sampler's (:class:`OnlineSampler`).
    """
    num_samples = check_num_samples(num_samples)
    sampler = OnlineSampler(module, temperature, path)
    max_len = _text_max_len(module)
    data = encode_prompt(prompt, max_len)
    x = torch.arange(max_len).expand(num_samples, -1)
    y = torch.zeros(num_samples, max_len, dtype=torch.long)
    known = torch.zeros(num_samples, max_len, dtype=torch.bool)
    if data:
        y[:, : len(data)] = torch.tensor(data)
        known[:, : len(data)] = True
    result = sampler.run(x, y, known, generator=generator, stop_token=END_TOKEN)
    return [decode_text(row) for row in result.y.cpu()]
