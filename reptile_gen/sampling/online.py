"""The online sampler: a module's inner SGD loop replayed over a batch of samples.

The prediction of element ``i`` is the model after one inner SGD step per
``inner_batch_size`` elements on the elements before it, starting from the meta-learned
initial parameters. A sample is drawn element by element: predict ``y_i`` at ``x_i``,
draw it (at a temperature), take the SGD step on ``(x_i, y_i)`` with the module's inner
learning rates (learned Meta-SGD, per-unit and per-step rates included) through the core
update (:func:`reptile_gen.inner_loop.core.sgd_update`; with ``algorithm.inner_momentum``
the heavy-ball step :func:`~reptile_gen.inner_loop.core.momentum_update`, the velocities
carried along like the parameters), go on. Every step is one
``torch.func.vmap`` over samples of a per-sample step (``torch.func.grad`` of the step's
loss, whose forward pass also draws the unknown elements), so the dynamics are exactly
those of the functional engine's online schedule (:meth:`OnlineSampler.feed` reproduces
the engine's ``element_losses``).

With ``task.prev_input`` (:attr:`~reptile_gen.data.TaskSpec.prev_input`) the model's input
of element ``i`` carries ``y_{i-1}``, the target of the element stepped on just before it
in the order the sampler goes (given or drawn; the start token before the first). The
sampler takes the elements' own coordinates and appends it: within one inner step of
several elements the draws go in order (each element's prediction uses the parameters of
the step, as in training, and its input the target just drawn or given), and the step's
loss is then the engine's, on the same inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from reptile_gen.inner_loop import masked_mean
from reptile_gen.inner_loop.core import momentum_update, sgd_update
from reptile_gen.inner_loop.core.guard import check_sampled_predictions
from reptile_gen.sampling.checks import (
    SamplingError,
    check_sampleable,
    check_temperature,
    sampling_path,
)
from reptile_gen.sampling.lowrank import run_lowrank

__all__ = ["OnlineSampler", "SequenceResult"]


@dataclass
class SequenceResult:
    """What :meth:`OnlineSampler.run` returns (leading dimension: samples).

    Attributes:
        y: ``[N, S]`` each element's target: the given one where known, the drawn one
            elsewhere, 0 where the model took no step (padding, after the end token).
        mask: ``[N, S]`` bool, the elements the model stepped on (an end token included).
        logits: ``[N, S, C]`` each element's prediction before the model trained on it
            (C = 256 classes for text, 1 logit for bits); 0 where ``mask`` is False.
        params: the adapted parameters ``{name: [N, ...]}`` after the sequence (a mapping;
            on the ``lowrank`` path made on first use).
        velocity: with inner momentum, their velocities ``{name: [N, ...]}`` (what a
            continued run starts from with the params); None for plain SGD.
    """

    y: torch.Tensor
    mask: torch.Tensor
    logits: torch.Tensor
    params: Mapping[str, torch.Tensor]
    velocity: dict[str, torch.Tensor] | None = None

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
            task (text, mnist, digits) with an SGD inner loop (plain or with inner momentum).
        temperature: > 0; the draw is from ``softmax(logits / temperature)`` (bits:
            ``Bernoulli(sigmoid(logit / temperature))``). The SGD step always uses the
            model's own loss on the drawn element, as in training.
        path: how the samples' inner loops are held: ``weights`` (per-sample weight
            copies, this class's :meth:`step`), ``lowrank`` (shared initial weights plus
            each sample's rank-one update history, the low-rank engine's step:
            :mod:`reptile_gen.sampling.lowrank`) or ``auto`` (``lowrank`` wherever it
            can replay the module, see :func:`~reptile_gen.sampling.checks.sampling_path`;
            ``weights`` for a run continued from given ``params``). Both give the same
            samples (the same dynamics, the same draws).
    """

    def __init__(self, module, temperature: float = 1.0, path: str = "auto") -> None:
        check_sampleable(module)
        self.temperature = check_temperature(temperature)
        #: ``weights`` or ``lowrank``, the path :meth:`run` takes (see ``sampling_path``;
        #: with ``auto``, a run continued from given parameters takes ``weights``)
        self.path = sampling_path(module, path)
        self.requested_path = path
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
        self.momentum = float(getattr(module.inner_lr, "momentum", 0.0))
        self.inner_batch_size = module.train_schedule.inner_batch_size
        first = next(iter(self.theta.values()))
        self.device, self.dtype = first.device, first.dtype
        self.num_outputs = self.spec.head_features
        self.target_dtype = torch.long if self.spec.output_kind == "classes" else self.dtype
        #: the target before a sequence's first element (``prev_input``: the start token)
        self.start_target = self.spec.start_token if self.spec.prev_input else 0

    # ------------------------------------------------------------------ one step
    def initial_params(self, num_samples: int) -> dict[str, torch.Tensor]:
        """The meta-learned initial parameters for ``num_samples`` samples (views)."""
        return {n: p.expand(num_samples, *p.shape) for n, p in self.theta.items()}

    def draw(self, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw from ``logits [..., C]`` with uniform ``noise [..., C]`` at the
        temperature: ``[...]`` targets (the Gumbel-max trick for classes, a threshold
        on the bit's probability for bits)."""
        scaled = logits / self.temperature
        if self.spec.output_kind == "classes":
            tiny = torch.finfo(noise.dtype).tiny
            gumbel = -torch.log(-torch.log(noise.clamp(min=tiny, max=1 - 1e-7)))
            return (scaled + gumbel).argmax(-1)
        return (noise[..., 0] < torch.sigmoid(scaled[..., 0])).to(self.target_dtype)

    def _forward(self, p, inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, (p, self.buffers), (inputs,))

    def _previous_in_order(self, p, x, y, known, noise, prev) -> torch.Tensor:
        """``[k]`` long: each element's previous target within one step, drawn in order
        from the step's parameters (``prev`` before the first)."""
        last, prevs = prev.long(), [prev.long()]
        for j in range(x.shape[0] - 1):
            raw = self._forward(p, self.spec.with_previous(x[j : j + 1], last.reshape(1)))
            drawn = self.draw(raw.reshape(1, self.num_outputs).detach(), noise[j : j + 1])
            last = torch.where(known[j], y[j], drawn[0].to(y.dtype)).long()
            prevs.append(last)
        return torch.stack(prevs)

    def _one_step(self, params, velocity, x, y, known, mask, noise, prev, stop_token, rates):
        """One sample, one inner step on elements ``x [k, ...]``: predict, draw the
        unknown ones, step on the masked mean loss (the engine's ``step_loss``).
        ``prev``: the target before the step's first element (``prev_input`` only);
        ``velocity``: the parameters' velocities with inner momentum (``{}`` without)."""

        def step_loss(p):
            inputs, prevs = x, None
            if self.spec.prev_input:
                prevs = self._previous_in_order(p, x, y, known, noise, prev)
                inputs = self.spec.with_previous(x, prevs)
            raw = self._forward(p, inputs)
            logits = raw.reshape(x.shape[0], self.num_outputs)
            drawn = self.draw(logits.detach(), noise)
            target = torch.where(known, y, drawn.to(y.dtype))
            if prevs is not None:
                # the elements' targets as drawn in order (the inputs were built from them)
                target = torch.cat([prevs[1:].to(y.dtype), target[-1:]])
            m = mask
            if stop_token is not None:
                # elements after an end token (in this step) are padding
                stops = ((target == stop_token) & m).long()
                m = m & (torch.cumsum(stops, 0) - stops == 0)
            elements = self.spec.elementwise_loss(raw, target)
            return masked_mean(elements, m), (target, m, logits.detach())

        grads, (target, m, logits) = grad(step_loss, has_aux=True)(params)
        if self.momentum:  # a step with no element (after the end) leaves both unchanged
            new, velocity = momentum_update(params, velocity, grads, rates, self.momentum, m.any())
        else:
            new = sgd_update(params, grads, rates)
        return new, torch.where(m, target, torch.zeros_like(target)), m, logits, velocity

    def step(
        self,
        params,
        x,
        y,
        known,
        mask,
        noise,
        stop_token: int | None = None,
        prev=None,
        rates=None,
        velocity=None,
    ):
        """One inner step for every sample at once (``vmap`` of the per-sample step).

        Args:
            params: ``{name: [N, ...]}`` the samples' current parameters.
            x: ``[N, k, ...]`` the step's inputs; y: ``[N, k]`` targets (used where known).
            known: ``[N, k]`` bool, given elements (the rest are drawn).
            mask: ``[N, k]`` bool, real elements (padding takes no step).
            noise: ``[N, k, C]`` uniform noise for the draws.
            stop_token: a target that ends the sequence (text: NUL), or None.
            prev: ``[N]`` the target before each sample's first element of the step
                (``prev_input`` only; default: the start token).
            rates: ``{name: rate}`` of this step (None: the base rates, as for a module
                whose rates do not change along the inner loop).
            velocity: ``{name: [N, ...]}`` the parameters' velocities (inner momentum
                only; None: zero, as before a sequence's first step).

        Returns:
            ``(params, y, mask, logits, velocity)`` after the step: the new parameters,
            the targets stepped on, the elements stepped on, ``[N, k, C]`` pre-step
            predictions and the new velocities (None for plain SGD).
        """
        rates = self.rates if rates is None else rates
        fn = partial(self._one_step, stop_token=stop_token, rates=rates)
        if prev is None:
            prev = torch.full(y.shape[:1], self.start_target, dtype=torch.long, device=y.device)
        if not self.momentum:
            velocity = {}
        elif velocity is None:
            velocity = {k: torch.zeros_like(p) for k, p in params.items()}
        with torch.enable_grad():
            out = vmap(fn, randomness="error")(params, velocity, x, y, known, mask, noise, prev)
        return (*out[:4], out[4] if self.momentum else None)

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
        prev: torch.Tensor | None = None,
        velocity: dict[str, torch.Tensor] | None = None,
    ) -> SequenceResult:
        """Run the online schedule over ``x [N, S, ...]`` (one step per
        ``inner_batch_size`` elements, in order), drawing every element not ``known``.

        ``y [N, S]`` holds the given targets (ignored where not known); ``known``
        defaults to none (pure generation), ``mask`` to all real. With ``known`` all
        True this is teacher forcing: exactly the training dynamics. The noise of the
        draws comes from ``generator`` (CPU), all of it up front, so a seeded generator
        gives the same samples. ``stop_token``: a drawn (or given) target that ends its
        sample. ``params``: start from these instead of the initial parameters (with
        inner momentum, ``velocity`` too: a run's :attr:`SequenceResult.velocity`).

        ``x`` holds the elements' own coordinates (text: positions; images: (row, col));
        with ``task.prev_input`` the sampler appends each element's previous target, the
        one stepped on just before it in this run (``prev [N]`` before the first: the
        target a continued run left off at; default: the start token).
        """
        n, s = x.shape[:2]
        self._check_coordinates(x)
        if self.momentum and params is not None and velocity is None:
            raise SamplingError(
                f"OnlineSampler.run: params given without their velocity; with "
                f"algorithm.inner_momentum={self.momentum:g} a continued run needs both "
                "(pass velocity=result.velocity of the run it continues)"
            )
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
        if self.path == "lowrank" and (params is None or self.requested_path == "lowrank"):
            if params is not None:
                raise SamplingError(
                    "OnlineSampler.run(params=...): the lowrank path starts from the "
                    "module's initial parameters; to continue from adapted parameters use "
                    "OnlineSampler(module, path='weights')"
                )
            return SequenceResult(*run_lowrank(self, x, y, known, mask, noise, stop_token, prev))
        params = self.initial_params(n) if params is None else dict(params)
        out_y = torch.zeros_like(y)
        out_mask = torch.zeros_like(mask)
        out_logits = torch.zeros(n, s, self.num_outputs, dtype=self.dtype, device=self.device)
        alive = torch.ones(n, dtype=torch.bool, device=self.device)
        last = (
            torch.full((n,), self.start_target, dtype=torch.long, device=self.device)
            if prev is None
            else prev.to(self.device).long().reshape(n)
        )
        b = self.inner_batch_size
        # the rate of each step, as in training (scheduled or per-step learned rates)
        plan = self.module.inner_lr.step_rates(len(range(0, s, b)))
        for start in range(0, s, b):
            end = min(start + b, s)
            chunk_mask = mask[:, start:end] & alive[:, None]
            params, ys, ms, logits, velocity = self.step(
                params,
                x[:, start:end],
                y[:, start:end],
                known[:, start:end],
                chunk_mask,
                noise[:, start:end],
                stop_token,
                last,
                plan.at(self.rates, start // b),
                velocity,
            )
            last = ys[:, -1].long()
            check_sampled_predictions(logits, ms, start, self.module.inner_lr)
            out_y[:, start:end], out_mask[:, start:end] = ys, ms
            out_logits[:, start:end] = logits.detach() * ms[..., None].to(self.dtype)
            if stop_token is not None:
                alive = alive & ~((ys == stop_token) & ms).any(1)
                if not alive.any():
                    break
        params = {k: v.detach() for k, v in params.items()}
        if velocity is not None:
            velocity = {k: v.detach() for k, v in velocity.items()}
        return SequenceResult(out_y, out_mask, out_logits, params, velocity)

    def feed(self, x, y, mask=None, params=None, prev=None, velocity=None) -> SequenceResult:
        """Teacher forcing: step through given targets ``y`` at ``x`` (the training
        dynamics); the result's :meth:`~SequenceResult.element_losses` are the online
        losses. ``x``, ``params``, ``prev`` and ``velocity`` as for :meth:`run`."""
        known = torch.ones(y.shape[:2], dtype=torch.bool)
        return self.run(x, y, known, mask, params=params, prev=prev, velocity=velocity)

    def _check_coordinates(self, x: torch.Tensor) -> None:
        """With ``prev_input``, ``x`` must hold the elements' coordinates only (the
        sampler appends the previous target): a clear error for model inputs."""
        if not self.spec.prev_input:
            return
        count = len(self.spec.input_sizes)
        if not (x.dim() == 2 and count == 1) and not (x.dim() == 3 and x.shape[-1] == count):
            raise SamplingError(
                f"OnlineSampler.run: x has shape {tuple(x.shape)}; with task.prev_input=true "
                f"it takes the elements' own {count} coordinate(s), [N, S] or [N, S, {count}] "
                "(the previous target is appended by the sampler; a batch's support_x gives "
                "them with task_spec.element_coordinates)"
            )
