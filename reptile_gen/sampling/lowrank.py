"""The sampler's low-rank path: the samples' inner loops held in the low-rank engine's form.

Instead of a copy of every weight per sample, updated at every step (the ``weights`` path),
the samples share the initial weights and each keeps its history of rank-one updates
(folded into a dense per-sample delta once that reads less): the forward pass of step
``t`` is one matmul with the shared weights plus the history's correction, the drawn
target is chosen between that forward pass and the loss, and the step appends its rows.
The step is the engine's (:class:`~reptile_gen.inner_loop.lowrank.online.OnlineRun`), so
its rates are the core's (fixed, scheduled, learned ``scalar``, ``per_tensor``,
``per_step``, ``per_layer_per_step``) and the dynamics are the ones the module trained
with on ``engine=lowrank``. The draws use the same noise as the ``weights`` path, so a
seed gives the same samples on both (tested in float64).

Limits (:func:`~reptile_gen.sampling.checks.sampling_path` refuses them with the
alternative, and ``auto`` takes ``weights``): ``per_parameter`` learned rates (they do not
factor out of the low-rank update), and ``task.prev_input`` with ``inner_batch_size > 1``
(the draws within a step would each need their own forward pass); a model whose linear or
embedding layer runs twice in a forward pass is a :class:`SamplingError` when the run
starts.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from reptile_gen.inner_loop.core.guard import check_sampled_predictions
from reptile_gen.inner_loop.lowrank import LowRankEngine
from reptile_gen.inner_loop.lowrank.online import OnlineRun
from reptile_gen.inner_loop.lowrank.state import pad_to
from reptile_gen.sampling.checks import SamplingError

__all__ = ["run_lowrank"]


class _Adapted(Mapping):
    """The samples' adapted parameters, made (dense) on first use only: generation does
    not read them, and they cost a weight copy per sample."""

    def __init__(self, states: list[OnlineRun]) -> None:
        self._states = states
        self._params: dict[str, torch.Tensor] | None = None

    def _get(self) -> dict[str, torch.Tensor]:
        if self._params is None:
            parts = [state.adapted() for state in self._states]
            self._params = {k: torch.cat([p[k] for p in parts]).detach() for k in parts[0]}
            self._states = []
        return self._params

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._get()[name]

    def __iter__(self):
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


def run_lowrank(sampler, x, y, known, mask, noise, stop_token, prev):
    """:meth:`OnlineSampler.run` on the low-rank path, from the initial parameters, with
    its prepared ``[N, S, ...]`` tensors; returns ``(y, mask, logits, params)`` as its
    :class:`SequenceResult` holds them. The samples run in chunks of the module's
    ``engine.chunk_size`` (all at once by default), which bounds the history's memory."""
    module = sampler.module
    n = x.shape[0]
    engine = module.engine if isinstance(module.engine, LowRankEngine) else LowRankEngine()
    last = (
        torch.full((n,), sampler.start_target, dtype=torch.long, device=sampler.device)
        if prev is None
        else prev.to(sampler.device).long().reshape(n)
    )
    size = engine.chunk_size or n
    parts = [
        _run_chunk(
            sampler,
            engine,
            *(t[i : i + size] for t in (x, y, known, mask, noise, last)),
            stop_token,
        )
        for i in range(0, n, size)
    ]
    out_y, out_mask, out_logits = (torch.cat([p[k] for p in parts]) for k in range(3))
    return out_y, out_mask, out_logits, _Adapted([p[3] for p in parts])


def _run_chunk(sampler, engine, x, y, known, mask, noise, last, stop_token):
    """The low-rank loop over the samples of one chunk (see :func:`run_lowrank`)."""
    module, spec = sampler.module, sampler.spec
    n, s = x.shape[:2]
    inputs = x
    if spec.prev_input:
        # the previous target goes in as each step is taken; this shape serves discovery
        inputs = spec.with_previous(x, torch.full((n, s), sampler.start_target, device=x.device))
    try:
        state = OnlineRun(
            engine, sampler.model, inputs, module.loss_fn, module.inner_lr, module.train_schedule
        )
    except RuntimeError as error:  # a model the low-rank form cannot hold (a layer run twice)
        raise SamplingError(f"path=lowrank: {error}; sample it with path=weights") from error
    width = state.width
    padded = max(state.num_steps * width, s)
    # a short last step is filled up with masked elements, as in the engine
    px, py, pk, pm, pn = (pad_to(t, padded) for t in (x, y, known, mask, noise))
    out_y = torch.zeros_like(py)
    out_mask = torch.zeros_like(pm)
    out_logits = torch.zeros(n, padded, sampler.num_outputs, dtype=sampler.dtype, device=px.device)
    alive = torch.ones(n, dtype=torch.bool, device=px.device)
    for i in range(state.num_steps):
        lo, hi = i * width, (i + 1) * width
        step_x = px[:, lo:hi]
        if spec.prev_input:  # width 1 (checked): the target stepped on just before
            step_x = spec.with_previous(step_x, last[:, None])
        chosen = {}

        def choose(outputs, step_y, step_m, lo=lo, hi=hi, chosen=chosen):
            logits = outputs.reshape(n, width, sampler.num_outputs)
            drawn = sampler.draw(logits, pn[:, lo:hi])
            target = torch.where(pk[:, lo:hi], step_y, drawn.to(step_y.dtype))
            if stop_token is not None:
                # elements after an end token (in this step) are padding
                stops = ((target == stop_token) & step_m).long()
                step_m = step_m & (torch.cumsum(stops, 1) - stops == 0)
            chosen.update(target=target, mask=step_m, logits=logits)
            return target, step_m

        step_m = pm[:, lo:hi] & alive[:, None]
        state.step(i, step_x, py[:, lo:hi], step_m, choose)
        ms = chosen["mask"]
        ys = torch.where(ms, chosen["target"], torch.zeros_like(chosen["target"]))
        logits = chosen["logits"]
        last = ys[:, -1].long()
        check_sampled_predictions(logits, ms, lo, module.inner_lr)
        out_y[:, lo:hi], out_mask[:, lo:hi] = ys, ms
        out_logits[:, lo:hi] = logits * ms[..., None].to(sampler.dtype)
        if stop_token is not None:
            alive = alive & ~((ys == stop_token) & ms).any(1)
            if not alive.any():
                break
    return out_y[:, :s], out_mask[:, :s], out_logits[:, :s], state
