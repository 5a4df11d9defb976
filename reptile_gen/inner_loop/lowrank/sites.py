"""The low-rank layers of a model (its sites), the hook tape that corrects their outputs
by each task's history, and the dense fold of a history."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.profiler import record_function

from reptile_gen.inner_loop.core import sgd_step

__all__ = ["FOLDS", "Site", "Tape", "candidate_sites", "fold", "folds"]


@dataclass
class Site:
    """A layer kept in low-rank form: its weight is shared, its updates are history rows."""

    name: str  # the weight's parameter name
    module: nn.Module
    embedding: bool
    rows: int = 0  # history rows one inner step adds (elements x leading dims)
    probe_shape: tuple[int, ...] = ()
    in_width: int = 0  # width of an input row (0: an embedding's index rows)
    out_width: int = 0


def candidate_sites(model: nn.Module) -> list[Site]:
    """Plain ``nn.Linear`` and ``nn.Embedding`` layers whose weight only they use.

    Subclasses may use their weight outside ``forward`` (``nn.MultiheadAttention``'s
    ``out_proj``), tied weights appear in two modules, and an embedding's padding row or
    max-norm renormalisation breaks the plain SGD update: those stay materialised.
    """
    owners: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    sites = []
    for mod_name, module in model.named_modules():
        kind = type(module)
        if kind is nn.Embedding:
            plain = (
                module.padding_idx is None
                and module.max_norm is None
                and not module.scale_grad_by_freq
                and not module.sparse
            )
            if not plain:
                continue
        elif kind is not nn.Linear:
            continue
        if owners[id(module.weight)] != 1 or not module.weight.requires_grad:
            continue
        name = f"{mod_name}.weight" if mod_name else "weight"
        sites.append(Site(name, module, kind is nn.Embedding))
    return sites


class Tape:
    """What the low-rank layers' hooks read and write during one (per-task) model call.

    ``pieces[i]``: history of site ``i`` as ``(A, D)`` pairs (rows of inputs or indices,
    and of output gradients); ``rates[i]``: its inner rate; ``probes[i]``: the zero added
    to its output (None: a call whose output gradients are not needed, e.g. the query).
    ``discover``: record shapes only (the first call of a run).
    """

    def __init__(self, pieces, rates, probes=None, discover: bool = False) -> None:
        self.pieces = pieces
        self.rates = rates
        self.probes = probes
        self.discover = discover
        n = len(rates)
        self.inputs: list[torch.Tensor | None] = [None] * n
        self.shapes: list[tuple | None] = [None] * n
        self.calls = [0] * n

    def apply(self, i: int, site: Site, x: torch.Tensor, out: torch.Tensor):
        if self.calls[i]:
            raise RuntimeError(
                f"engine=lowrank: the layer of {site.name!r} ran twice in one "
                "forward pass; the low-rank form needs each nn.Linear/nn.Embedding to run "
                "once (use engine=functional for this model)"
            )
        self.calls[i] = 1
        if self.discover:
            self.shapes[i] = (tuple(x.shape), tuple(out.shape))
            return None
        with record_function("lowrank.history"):
            out = self._correct(i, site, x, out)
        if self.probes is not None:
            out = out + self.probes[i]
            self.inputs[i] = (
                x.reshape(site.rows) if site.embedding else x.reshape(site.rows, site.in_width)
            )
        return out

    def _correct(self, i: int, site: Site, x: torch.Tensor, out: torch.Tensor):
        """``out`` minus the rate times the history's correction at inputs ``x``."""
        correction = None
        for piece in self.pieces[i]:
            if len(piece) == 1:  # a folded (dense) delta of the weight, (dW,)
                dw = piece[0]
                if site.embedding:
                    c = torch.nn.functional.embedding(x, dw)
                else:
                    c = x @ dw.transpose(-1, -2)
            elif site.embedding:
                c = (x.unsqueeze(-1) == piece[0]).to(piece[1].dtype) @ piece[1]
            else:
                c = (x @ piece[0].transpose(-1, -2)) @ piece[1]
            correction = c if correction is None else correction + c
        if correction is not None:
            out = sgd_step(out, correction, self.rates[i])
        return out


#: ``LowRankEngine(fold=...)`` values
FOLDS = ("auto", "always", "never")


def folds(site: Site, weight: torch.Tensor, rows: int, mode: str = "auto") -> bool:
    """Whether to fold ``rows`` history rows into a dense per-task weight delta: with
    ``mode="auto"``, when they cost more per use (``rows * (in + out)`` against
    ``in * out`` numbers read, and the same written as gradient at every step of a
    recomputed segment); ``always`` or ``never`` force it."""
    if mode != "auto":
        return mode == "always"
    if site.embedding:
        return rows * (1 + site.out_width) > weight.numel()
    return rows * (site.in_width + site.out_width) > weight.numel()


def fold(site: Site, weight: torch.Tensor, a: torch.Tensor, d: torch.Tensor) -> tuple:
    """History rows ``(A [B, r, in], D [B, r, out])`` as one dense per-task delta
    ``(D^T A,)`` of the weight's shape (for an embedding: ``D`` summed into the rows ``A``
    index), made with the graph, so the rows' gradient comes back through one GEMM per
    segment instead of a dense ``[B, r, width]`` gradient at every step."""
    if site.embedding:
        out = torch.zeros(a.shape[0], *weight.shape, dtype=d.dtype, device=d.device)
        return (out.scatter_add(1, a.unsqueeze(-1).expand(-1, -1, d.shape[-1]), d),)
    return (torch.bmm(d.transpose(1, 2), a),)
