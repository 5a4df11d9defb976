"""Sampling from SGD as a generative sequence model: generation and completion.

A trained module defines a distribution over sequences: the prediction of element ``i``
is the model after one inner SGD step per element (``inner_batch_size`` elements per
step) on the elements before it, starting from the meta-learned initial parameters. So a
sample is drawn element by element: predict ``y_i`` at ``x_i``, draw it (at a
temperature), take the SGD step on ``(x_i, y_i)`` with the module's inner learning rates
(learned Meta-SGD rates included), go on. Conditioning is the same loop with some
elements given instead of drawn: a text prompt (the first positions), or the known pixels
of an image (fed first, in the task's pixel order restricted to the known set, then the
unknown ones are drawn). Any subset of elements in any order works without retraining.

Everything is batched over samples: each step is one ``torch.func.vmap`` of a per-sample
step (``torch.func.grad`` of the step's loss, whose forward pass also draws the
unknown elements, then the SGD update), so the dynamics are exactly those of the
functional engine's online schedule (:meth:`OnlineSampler.run` with every element given
reproduces the engine's ``element_losses``).

Only plain SGD inner loops are replayed: a checkpoint trained with another inner
optimizer (``algorithm.inner_loop=higher`` with Adam, momentum, ...) is a clear error.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from reptile_gen.inner_loop.base import masked_mean
from reptile_gen.utils.user_errors import UserError

__all__ = [
    "COMPLETE_KINDS",
    "OnlineSampler",
    "SamplingError",
    "SequenceResult",
    "check_sampleable",
    "complete",
    "complete_images",
    "completion_mask",
    "decode_text",
    "encode_prompt",
    "escape_text",
    "generate_images",
    "generate_text",
    "report_image_samples",
    "report_text_samples",
    "save_completion_figure",
    "save_image_grid",
    "write_text_samples",
]

log = logging.getLogger(__name__)

#: ways ``python -m reptile_gen.sample complete=...`` chooses the known pixels
COMPLETE_KINDS = ("top_half", "left_half", "random")
#: the text tasks' end token (NUL), as in :mod:`reptile_gen.data.text`
END_TOKEN = 0
#: SGD keyword arguments that leave plain SGD unchanged
_PLAIN_SGD = {"momentum": 0, "dampening": 0, "weight_decay": 0, "nesterov": False}


class SamplingError(UserError):
    """A checkpoint or an option that sampling cannot work with; the message says why."""


# ---------------------------------------------------------------------------- checks
def check_sampleable(module) -> None:
    """A clear :class:`SamplingError` unless ``module`` is a sequence model whose inner
    loop is plain SGD (what the sampler replays)."""
    from reptile_gen.algorithms.base import MetaLearner

    if not isinstance(module, MetaLearner) or type(module).adapt is not MetaLearner.adapt:
        raise SamplingError(
            f"cannot sample a {type(module).__name__} checkpoint: the sampler replays the "
            "inner SGD loop of a meta-learned sequence model (algorithm=maml, fomaml, "
            "reptile or joint), and this module has no such inner loop (e.g. the LSTM "
            "baseline, algorithm=lstm)"
        )
    spec = module.task_spec
    if not spec.sequential or not getattr(module, "is_sequence_model", False):
        raise SamplingError(
            f"sampling needs a sequence task: text, mnist or digits (this checkpoint's task "
            f"is {spec.name!r}, a few-shot task, not a sequence model)"
        )
    if spec.output_kind not in ("classes", "bits"):
        raise SamplingError(
            f"sampling needs discrete outputs (classes or bits); task {spec.name!r} has "
            f"output_kind={spec.output_kind!r}"
        )
    engine = module.engine
    name = type(engine).__name__
    if name in ("FunctionalEngine", "LowRankEngine"):  # both run plain SGD, exactly
        return
    if name == "HigherEngine":
        optimizer = engine.inner_optimizer
        kwargs = dict(engine.inner_optimizer_kwargs)
        plain = optimizer == "sgd" and all(
            k in _PLAIN_SGD and v == _PLAIN_SGD[k] for k, v in kwargs.items()
        )
        if plain:
            return
        shown = ", ".join([f"name: {optimizer}"] + [f"{k}: {v}" for k, v in kwargs.items()])
        raise SamplingError(
            f"this checkpoint's inner optimizer is algorithm.inner_optimizer={{{shown}}}: "
            "the sampler replays the inner loop as plain SGD (the functional engine's "
            "dynamics) and does not replay other inner optimizers; sample a checkpoint "
            "trained with algorithm.inner_optimizer.name=sgd (no momentum or weight decay)"
        )
    raise SamplingError(f"cannot sample with inner-loop engine {name}: only plain SGD is replayed")


def _check_temperature(temperature) -> float:
    ok = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
    if not ok or not math.isfinite(temperature) or temperature <= 0:
        raise SamplingError(
            f"temperature={temperature!r}; must be a number > 0 and finite (1.0: the model's own "
            "distribution; smaller: closer to the most likely element)"
        )
    return float(temperature)


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise SamplingError(f"num_samples={num_samples!r}; must be an integer >= 1")
    return num_samples


# ---------------------------------------------------------------------------- core
@dataclass
class SequenceResult:
    """What :meth:`OnlineSampler.run` returns (leading dimension: samples).

    Attributes:
        y: ``[N, S]`` each element's target: the given one where known, the drawn one
            elsewhere, 0 where the model took no step (padding, after the end token).
        mask: ``[N, S]`` bool, the elements the model stepped on (an end token included).
        logits: ``[N, S, C]`` each element's prediction before the model trained on it
            (C = 256 classes for text, 1 logit for bits); 0 where ``mask`` is False.
        params: the adapted parameters ``{name: [N, ...]}`` after the sequence.
    """

    y: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    params: dict[str, torch.Tensor]

    def element_losses(self, spec) -> torch.Tensor:
        """``[N, S]`` each element's loss before the model trained on it (0 off the mask):
        summed over a sequence, its online negative log-likelihood in nats."""
        losses = spec.elementwise_loss(self.logits, self.y)
        return losses * self.mask.to(losses.dtype)


class OnlineSampler:
    """Replays a module's inner SGD over a batch of samples, drawing the elements that
    are not given.

    Args:
        module: a trained :class:`~reptile_gen.algorithms.base.MetaLearner` of a sequence
            task (text, mnist, digits) with a plain SGD inner loop.
        temperature: > 0; the draw is from ``softmax(logits / temperature)`` (bits:
            ``Bernoulli(sigmoid(logit / temperature))``). The SGD step always uses the
            model's own loss on the drawn element, as in training.
    """

    def __init__(self, module, temperature: float = 1.0) -> None:
        check_sampleable(module)
        self.temperature = _check_temperature(temperature)
        self.module = module
        self.model: nn.Module = module.model
        self.spec = module.task_spec
        self.names = [n for n, _ in self.model.named_parameters()]
        self.theta = {n: p.detach() for n, p in self.model.named_parameters()}
        self.rates = {
            k: (r.detach() if torch.is_tensor(r) else r)
            for k, r in module.inner_lr.rates_by_name().items()
        }
        self.buffers = {n: b.detach() for n, b in self.model.named_buffers()}
        self.inner_batch_size = module.train_schedule.inner_batch_size
        first = next(iter(self.theta.values()))
        self.device, self.dtype = first.device, first.dtype
        self.num_outputs = self.spec.head_features
        self.target_dtype = torch.long if self.spec.output_kind == "classes" else self.dtype

    # ------------------------------------------------------------------ one step
    def initial_params(self, num_samples: int) -> dict[str, torch.Tensor]:
        """The meta-learned initial parameters for ``num_samples`` samples (views)."""
        return {n: p.expand(num_samples, *p.shape) for n, p in self.theta.items()}

    def _draw(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw from ``logits [k, C]`` with uniform ``noise [k, C]`` at the temperature."""
        scaled = logits / self.temperature
        if self.spec.output_kind == "classes":
            tiny = torch.finfo(noise.dtype).tiny
            gumbel = -torch.log(-torch.log(noise.clamp(min=tiny, max=1 - 1e-7)))
            return (scaled + gumbel).argmax(-1)
        return (noise[..., 0] < torch.sigmoid(scaled[..., 0])).to(self.target_dtype)

    def _one_step(self, params, x, y, known, mask, noise, stop_token):
        """One sample, one inner step on elements ``x [k, ...]``: predict, draw the
        unknown ones, step on the masked mean loss (the engine's ``step_loss``)."""

        def step_loss(p):
            raw = functional_call(self.model, (p, self.buffers), (x,))
            logits = raw.reshape(x.shape[0], self.num_outputs)
            drawn = self._draw(logits.detach(), noise)
            target = torch.where(known, y, drawn.to(y.dtype))
            m = mask
            if stop_token is not None:
                # elements after an end token (in this step) are padding
                stops = ((target == stop_token) & m).long()
                m = m & (torch.cumsum(stops, 0) - stops == 0)
            elements = self.spec.elementwise_loss(raw, target)
            return masked_mean(elements, m), (target, m, logits.detach())

        grads, (target, m, logits) = grad(step_loss, has_aux=True)(params)
        new = {n: params[n] - self.rates[n] * grads[n] for n in self.names}
        return new, torch.where(m, target, torch.zeros_like(target)), m, logits

    def step(self, params, x, y, known, mask, noise, stop_token: int | None = None):
        """One inner step for every sample at once (``vmap`` of the per-sample step).

        Args:
            params: ``{name: [N, ...]}`` the samples' current parameters.
            x: ``[N, k, ...]`` the step's inputs; y: ``[N, k]`` targets (used where known).
            known: ``[N, k]`` bool, given elements (the rest are drawn).
            mask: ``[N, k]`` bool, real elements (padding takes no step).
            noise: ``[N, k, C]`` uniform noise for the draws.
            stop_token: a target that ends the sequence (text: NUL), or None.

        Returns:
            ``(params, y, mask, logits)`` after the step: the new parameters, the targets
            stepped on, the elements stepped on and ``[N, k, C]`` pre-step predictions.
        """
        fn = partial(self._one_step, stop_token=stop_token)
        with torch.enable_grad():
            return vmap(fn, randomness="error")(params, x, y, known, mask, noise)

    # ------------------------------------------------------------------ sequences
    def run(
        self,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        known: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        stop_token: int | None = None,
        params: dict[str, torch.Tensor] | None = None,
    ) -> SequenceResult:
        """Run the online schedule over ``x [N, S, ...]`` (one step per
        ``inner_batch_size`` elements, in order), drawing every element not ``known``.

        ``y [N, S]`` holds the given targets (ignored where not known); ``known``
        defaults to none (pure generation), ``mask`` to all real. With ``known`` all
        True this is teacher forcing: exactly the training dynamics. The noise of the
        draws comes from ``generator`` (CPU), all of it up front, so a seeded generator
        gives the same samples. ``stop_token``: a drawn (or given) target that ends its
        sample. ``params``: start from these instead of the initial parameters.
        """
        n, s = x.shape[:2]
        x = x.to(self.device)
        y = (
            torch.zeros(n, s, dtype=self.target_dtype, device=self.device)
            if y is None
            else y.to(self.device, self.target_dtype)
        )
        known = (
            torch.zeros(n, s, dtype=torch.bool, device=self.device)
            if known is None
            else known.to(self.device, torch.bool)
        )
        mask = (
            torch.ones(n, s, dtype=torch.bool, device=self.device)
            if mask is None
            else mask.to(self.device, torch.bool)
        )
        noise = torch.rand(n, s, self.num_outputs, generator=generator, dtype=self.dtype)
        noise = noise.to(self.device)
        params = self.initial_params(n) if params is None else params
        out_y = torch.zeros_like(y)
        out_mask = torch.zeros_like(mask)
        out_logits = torch.zeros(n, s, self.num_outputs, dtype=self.dtype, device=self.device)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        b = self.inner_batch_size
        for start in range(0, s, b):
            end = min(start + b, s)
            chunk_mask = mask[:, start:end] & alive[:, None]
            params, ys, ms, logits = self.step(
                params,
                x[:, start:end],
                y[:, start:end],
                known[:, start:end],
                chunk_mask,
                noise[:, start:end],
                stop_token,
            )
            out_y[:, start:end], out_mask[:, start:end] = ys, ms
            out_logits[:, start:end] = logits.detach() * ms[..., None].to(self.dtype)
            if stop_token is not None:
                alive = alive & ~((ys == stop_token) & ms).any(1)
                if not alive.any():
                    break
        params = {k: v.detach() for k, v in params.items()}
        return SequenceResult(out_y, out_mask, out_logits, params)

    def feed(self, x, y, mask=None, params=None) -> SequenceResult:
        """Teacher forcing: step through given targets ``y`` at ``x`` (the training
        dynamics); the result's :meth:`~SequenceResult.element_losses` are the online
        losses."""
        known = torch.ones(y.shape[:2], dtype=torch.bool)
        return self.run(x, y, known, mask, params=params)


# ---------------------------------------------------------------------------- text
def encode_prompt(prompt: str, max_len: int) -> list[int]:
    """The UTF-8 bytes of ``prompt``; a clear error if it cannot fit before the end token."""
    data = list(str(prompt).encode("utf-8"))
    if END_TOKEN in data:
        raise SamplingError("prompt contains a NUL byte: NUL is the end token of a text")
    if len(data) > max_len - 1:
        raise SamplingError(
            f"prompt is {len(data)} bytes long but the model's max_len is {max_len}: a "
            f"prompt may have at most max_len - 1 = {max_len - 1} bytes (one position is "
            "left for the end token); shorten the prompt"
        )
    return data


def decode_text(codes: Sequence[int] | torch.Tensor) -> str:
    """Bytes up to the first end token, decoded as UTF-8 (invalid bytes replaced)."""
    codes = [int(c) for c in codes]
    if END_TOKEN in codes:
        codes = codes[: codes.index(END_TOKEN)]
    return bytes(codes).decode("utf-8", errors="replace")


def _text_max_len(module) -> int:
    spec = module.task_spec
    if spec.output_kind != "classes" or len(spec.input_sizes) != 1:
        raise SamplingError(
            f"text sampling needs a text checkpoint (task=text); this one's task is {spec.name!r}"
        )
    return int(spec.input_sizes[0])


def generate_text(
    module,
    num_samples: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    prompt: str = "",
) -> list[str]:
    """``num_samples`` texts from a text checkpoint, each starting with ``prompt``.

    The prompt's bytes are fed first at positions ``0..len-1`` (teacher-forced, exactly
    like training), then bytes are drawn until the end token (NUL) or ``max_len``. The
    returned texts include the prompt.
    """
    num_samples = _check_num_samples(num_samples)
    sampler = OnlineSampler(module, temperature)
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


# ---------------------------------------------------------------------------- images
def _image_side(module) -> tuple[int, int]:
    spec = module.task_spec
    if spec.output_kind != "bits" or len(spec.input_sizes) != 2:
        raise SamplingError(
            f"image sampling needs an image checkpoint (task=mnist or digits); this one's "
            f"task is {spec.name!r}"
        )
    return int(spec.input_sizes[0]), int(spec.input_sizes[1])


def _coords(height: int, width: int) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)  # [HW, 2], raster


def generate_images(
    module,
    num_samples: int = 16,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[N, H, W]`` binary images drawn pixel by pixel in ``order`` (``[N, HW]`` raster
    indices, e.g. the datamodule's ``order_for``; default: raster order)."""
    num_samples = _check_num_samples(num_samples)
    sampler = OnlineSampler(module, temperature)
    height, width = _image_side(module)
    hw = height * width
    order = torch.arange(hw).expand(num_samples, -1) if order is None else order.cpu()
    coords = _coords(height, width)
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
):
    """Complete images from some known pixels, any subset in any order, no retraining.

    The model first steps on the known pixels (teacher-forced, in the given order), then
    draws the unknown ones in the given order, stepping on each as it goes.

    Args:
        coords_known: ``[N, K, 2]`` (row, col) of the known pixels, or a list of
            ``[K_n, 2]`` (a different number per sample).
        bits_known: ``[N, K]`` their bits (or a list of ``[K_n]``).
        coords_unknown: ``[N, U, 2]`` the pixels to draw (or a list of ``[U_n, 2]``).

    Returns:
        the drawn bits of the unknown pixels: ``[N, U]``, or a list of ``[U_n]`` when
        lists were given.
    """
    sampler = OnlineSampler(module, temperature)
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
) -> torch.Tensor:
    """``[N, H, W]`` completions of binary ``images [N, H, W]`` from their ``known``
    pixels (``[N, H, W]`` bool): the known ones are fed first in ``order`` (``[N, HW]``
    raster indices, the task's pixel order; default raster) restricted to the known set,
    then the rest are drawn in that order. Known pixels are kept exactly."""
    height, width = _image_side(module)
    n, hw = images.shape[0], height * width
    bits = images.reshape(n, hw).cpu()
    known = known.reshape(n, hw).cpu().bool()
    order = torch.arange(hw).expand(n, -1) if order is None else order.cpu()
    coords = _coords(height, width)
    coords_known, bits_known, coords_unknown, unknown_index = [], [], [], []
    for i in range(n):
        is_known = known[i, order[i]]
        k_idx, u_idx = order[i][is_known], order[i][~is_known]
        coords_known.append(coords[k_idx])
        bits_known.append(bits[i, k_idx])
        coords_unknown.append(coords[u_idx])
        unknown_index.append(u_idx)
    drawn = complete(module, coords_known, bits_known, coords_unknown, temperature, generator)
    out = bits.clone().to(drawn[0].dtype if drawn else bits.dtype)
    for i in range(n):
        out[i, unknown_index[i]] = drawn[i].to(out.dtype)
    return out.reshape(n, height, width)


# ---------------------------------------------------------------------------- files
def _tile(images, columns: int, scale: int, pad: int = 1, fill: float = 0.5):
    """Images ``[N, H, W]`` in ``[0, 1]`` as one ``[rows*H', columns*W']`` array."""
    import numpy as np

    images = torch.as_tensor(images).float().cpu().numpy()
    n, h, w = images.shape
    rows = max(1, math.ceil(n / columns))
    big = np.kron(images, np.ones((1, scale, scale)))
    ch, cw = h * scale + pad, w * scale + pad
    grid = np.full((rows * ch + pad, columns * cw + pad), fill, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, columns)
        grid[pad + r * ch : pad + r * ch + h * scale, pad + c * cw : pad + c * cw + w * scale] = (
            big[i]
        )
    return grid


def _scale_for(side: int) -> int:
    return max(1, math.ceil(56 / side))


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int | None = None) -> Path:
    """Binary images ``[N, H, W]`` as one PNG grid (white = 1, grey borders)."""
    from matplotlib.image import imsave

    n = images.shape[0]
    columns = columns or max(1, math.ceil(math.sqrt(n)))
    grid = _tile(images, columns, _scale_for(images.shape[-1]))
    path = Path(path)
    imsave(path, grid, cmap="gray", vmin=0.0, vmax=1.0)
    return path


def save_completion_figure(
    original: torch.Tensor, known: torch.Tensor, completed: torch.Tensor, path: str | Path
) -> Path:
    """Three labelled rows: the originals, the known pixels (unknown ones grey) and the
    completions."""
    from reptile_gen.utils.plots import plt

    original = torch.as_tensor(original).float().cpu()
    known = torch.as_tensor(known).bool().cpu()
    masked = torch.where(known, original, torch.full_like(original, 0.5))
    n, side = original.shape[0], original.shape[-1]
    scale = _scale_for(side)
    rows = [
        ("original", original),
        ("known pixels", masked),
        ("completion", torch.as_tensor(completed).float().cpu()),
    ]
    fig, axes = plt.subplots(3, 1, figsize=(max(3.0, 0.9 * n + 1.2), 3.6))
    for ax, (label, images) in zip(axes, rows):
        ax.imshow(_tile(images, n, scale), cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def escape_text(text: str) -> str:
    """``text`` on one printable line: control characters and line breaks (``\\n``,
    ``\\x0b``, ``\\u2028``, ...) written as Python escapes, tabs kept."""
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if ch != "\t" and (not ch.isprintable() or ch == "\\")
        else ch
        for ch in text
    )


def write_text_samples(texts: list[str], path: str | Path) -> Path:
    """One text per line, escaped by :func:`escape_text` (so a line is a sample)."""
    path = Path(path)
    path.write_text("".join(escape_text(t) + "\n" for t in texts), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- reports
def _report(make, what: str) -> list[Path]:
    try:
        return make()
    except SamplingError as err:
        log.warning("no %s written: %s", what, err)
        return []


def report_text_samples(
    module, out_dir: str | Path, num_samples: int = 8, seed: int = 0, temperature: float = 1.0
) -> list[Path]:
    """``out_dir/samples.txt``: a few texts drawn from ``module`` (a warning, no file,
    when the module cannot be sampled)."""

    def make():
        generator = torch.Generator().manual_seed(seed)
        texts = generate_text(module, num_samples, temperature, generator)
        return [write_text_samples(texts, Path(out_dir) / "samples.txt")]

    return _report(make, "samples.txt")


def report_image_samples(
    module,
    out_dir: str | Path,
    num_samples: int = 8,
    seed: int = 0,
    order_for=None,
    temperature: float = 1.0,
) -> list[Path]:
    """``out_dir/samples.png``: a few images drawn from ``module`` in the task's pixel
    order (``order_for(n, generator)``; a warning, no file, when it cannot be sampled)."""

    def make():
        generator = torch.Generator().manual_seed(seed)
        order = order_for(num_samples, generator) if order_for is not None else None
        images = generate_images(module, num_samples, temperature, generator, order)
        return [save_image_grid(images, Path(out_dir) / "samples.png")]

    return _report(make, "samples.png")
