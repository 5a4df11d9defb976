"""Sampling from SGD as a generative sequence model: generation and completion.

A trained module defines a distribution over sequences: the prediction of element ``i``
is the model after one inner SGD step per element (``inner_batch_size`` elements per
step) on the elements before it, starting from the meta-learned initial parameters.
Conditioning is the same loop with some elements given instead of drawn: a text prompt
(the first positions), or the known pixels of an image.

* :mod:`~reptile_gen.sampling.online`: :class:`OnlineSampler`, the replayed inner loop
  (per-sample weight copies, or the low-rank engine's form:
  :mod:`~reptile_gen.sampling.lowrank`);
* :mod:`~reptile_gen.sampling.text`: text generation (``task.kind == "text"``);
* :mod:`~reptile_gen.sampling.images`: image generation and completion
  (``task.kind == "image"``);
* :mod:`~reptile_gen.sampling.checks`: what can be sampled, :class:`SamplingError`, and
  which path (:func:`sampling_path`).

Only plain SGD inner loops are replayed: a checkpoint trained with another inner
optimizer (``engine=higher`` with Adam, momentum, ...) is a clear error.
Files (sample grids, ``samples.txt``) are written by :mod:`reptile_gen.reports`.
"""

from __future__ import annotations

from reptile_gen.sampling.checks import (
    SAMPLING_PATHS,
    SamplingError,
    check_num_samples,
    check_path,
    check_sampleable,
    check_temperature,
    sampling_path,
)
from reptile_gen.sampling.images import (
    COMPLETE_KINDS,
    complete,
    complete_images,
    completion_mask,
    generate_images,
)
from reptile_gen.sampling.online import OnlineSampler, SequenceResult
from reptile_gen.sampling.text import decode_text, encode_prompt, generate_text

__all__ = [
    "COMPLETE_KINDS",
    "OnlineSampler",
    "SAMPLING_PATHS",
    "SamplingError",
    "SequenceResult",
    "check_num_samples",
    "check_path",
    "check_sampleable",
    "check_temperature",
    "complete",
    "complete_images",
    "completion_mask",
    "decode_text",
    "encode_prompt",
    "generate_images",
    "generate_text",
    "sampling_path",
]
