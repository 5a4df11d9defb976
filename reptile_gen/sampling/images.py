"""Binary images from an image checkpoint: generation and completion.

Pixels are visited in the task's pixel order (the datamodule's ``order_for``) on the
task's pixel grid (:func:`reptile_gen.data.images.pixel_grid`). Completion feeds the known
pixels first (teacher-forced, in that order restricted to the known set), then draws the
unknown ones: any subset of pixels in any order works without retraining.
"""

from __future__ import annotations

import torch

from reptile_gen.data.images import pixel_grid
from reptile_gen.sampling.checks import SamplingError, check_num_samples, check_task_kind
from reptile_gen.sampling.online import OnlineSampler

__all__ = [
    "COMPLETE_KINDS",
    "complete",
    "complete_images",
    "completion_mask",
    "generate_images",
]

#: ways ``python -m reptile_gen.sample complete=...`` chooses the known pixels
COMPLETE_KINDS = ("top_half", "left_half", "random")


def _image_side(module) -> tuple[int, int]:
    check_task_kind(module, "image", "image")
    spec = module.task_spec
    return int(spec.input_sizes[0]), int(spec.input_sizes[1])


def generate_images(
    module,
    num_samples: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``[N, H, W]`` binary images drawn pixel by pixel in ``order`` (``[N, HW]`` raster
    indices, e.g. the datamodule's ``order_for``; default: raster order); ``path``: the
    sampler's (:class:`OnlineSampler`)."""
    num_samples = check_num_samples(num_samples)
    sampler = OnlineSampler(module, temperature, path)
    height, width = _image_side(module)
    hw = height * width
    order = torch.arange(hw).expand(num_samples, -1) if order is None else order.cpu()
    coords = pixel_grid(height, width)
    result = sampler.run(coords[order], generator=generator)
    images = torch.zeros(num_samples, hw, dtype=result.y.dtype)
    images.scatter_(1, order, result.y.cpu())
    return images.reshape(num_samples, height, width)


def _as_list(value) -> list[torch.Tensor]:
    return [torch.as_tensor(v) for v in value]


def complete(
    module,
    coords_known,
    bits_known,
    coords_unknown,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    path: str = "auto",
):
    """Complete images from some known pixels, any subset in any order, no retraining.

    The model first steps on the known pixels (teacher-forced, in the given order), then
    draws the unknown ones in the given order, stepping on each as it goes.

    Args:
        coords_known: ``[N, K, 2]`` (row, col) of the known pixels, or a list of
            ``[K_n, 2]`` (a different number per sample).
        bits_known: ``[N, K]`` their bits (or a list of ``[K_n]``).
        coords_unknown: ``[N, U, 2]`` the pixels to draw (or a list of ``[U_n, 2]``).
        path: the sampler's (:class:`OnlineSampler`).

    Returns:
        the drawn bits of the unknown pixels: ``[N, U]``, or a list of ``[U_n]`` when
        lists were given.
    """
    sampler = OnlineSampler(module, temperature, path)
    _image_side(module)
    as_tensors = torch.is_tensor(coords_known) and torch.is_tensor(coords_unknown)
    ck, bk, cu = _as_list(coords_known), _as_list(bits_known), _as_list(coords_unknown)
    if not (len(ck) == len(bk) == len(cu)) or not ck:
        raise SamplingError(
            f"complete: coords_known, bits_known and coords_unknown need the same number "
            f"(>= 1) of samples; got {len(ck)}, {len(bk)} and {len(cu)}"
        )
    n = len(ck)
    lengths = [a.shape[0] + c.shape[0] for a, c in zip(ck, cu)]
    s = max(lengths)
    x = torch.zeros(n, s, 2, dtype=torch.long)
    y = torch.zeros(n, s, dtype=sampler.target_dtype)
    known = torch.zeros(n, s, dtype=torch.bool)
    mask = torch.zeros(n, s, dtype=torch.bool)
    for i, (a, bits, c) in enumerate(zip(ck, bk, cu)):
        k, u = a.shape[0], c.shape[0]
        if bits.shape[0] != k:
            raise SamplingError(
                f"complete: sample {i} has {k} known coordinates but {bits.shape[0]} known bits"
            )
        # known first, then unknown, padding last: the real elements' steps are those of
        # an unpadded run
        x[i, :k], x[i, k : k + u] = a.long(), c.long()
        y[i, :k] = bits.to(y.dtype)
        known[i, :k] = True
        mask[i, : k + u] = True
    result = sampler.run(x, y, known, mask, generator=generator)
    drawn = [result.y[i, a.shape[0] : lengths[i]].cpu() for i, a in enumerate(ck)]
    if as_tensors and len({d.shape[0] for d in drawn}) == 1:
        return torch.stack(drawn)
    return drawn


def completion_mask(
    kind: str,
    num: int,
    height: int,
    width: int,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[num, H, W]`` bool, the known pixels: ``top_half``, ``left_half`` or ``random``
    (``round(fraction * HW)`` pixels per image, drawn from ``generator``)."""
    if kind not in COMPLETE_KINDS:
        raise SamplingError(f"complete={kind!r}; allowed: {', '.join(COMPLETE_KINDS)} (or null)")
    known = torch.zeros(num, height, width, dtype=torch.bool)
    if kind == "top_half":
        known[:, : height // 2] = True
    elif kind == "left_half":
        known[:, :, : width // 2] = True
    else:
        ok = isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
        if not ok or not 0 <= fraction <= 1:
            raise SamplingError(f"complete_fraction={fraction!r}; must be a number in [0, 1]")
        hw = height * width
        count = round(fraction * hw)
        flat = known.reshape(num, hw)
        for i in range(num):
            flat[i, torch.randperm(hw, generator=generator)[:count]] = True
    return known


def complete_images(
    module,
    images: torch.Tensor,
    known: torch.Tensor,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
    path: str = "auto",
) -> torch.Tensor:
    """``[N, H, W]`` completions of binary ``images [N, H, W]`` from their ``known``
    pixels (``[N, H, W]`` bool): the known ones are fed first in ``order`` (``[N, HW]``
    raster indices, the task's pixel order; default raster) restricted to the known set,
    then the rest are drawn in that order. Known pixels are kept exactly. ``path``: the
    sampler's (:class:`OnlineSampler`)."""
    height, width = _image_side(module)
    n, hw = images.shape[0], height * width
    bits = images.reshape(n, hw).cpu()
    known = known.reshape(n, hw).cpu().bool()
    order = torch.arange(hw).expand(n, -1) if order is None else order.cpu()
    coords = pixel_grid(height, width)
    coords_known, bits_known, coords_unknown, unknown_index = [], [], [], []
    for i in range(n):
        is_known = known[i, order[i]]
        k_idx, u_idx = order[i][is_known], order[i][~is_known]
        coords_known.append(coords[k_idx])
        bits_known.append(bits[i, k_idx])
        coords_unknown.append(coords[u_idx])
        unknown_index.append(u_idx)
    drawn = complete(module, coords_known, bits_known, coords_unknown, temperature, generator, path)
    out = bits.clone().to(drawn[0].dtype if drawn else bits.dtype)
    for i in range(n):
        out[i, unknown_index[i]] = drawn[i].to(out.dtype)
    return out.reshape(n, height, width)
