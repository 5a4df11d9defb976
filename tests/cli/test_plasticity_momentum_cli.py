"""``algorithm.inner_lr_learned=per_unit`` and ``algorithm.inner_momentum`` through the real
command lines: train a couple of steps (digits on the low-rank engine with per-unit rates;
text with momentum on the functional engine), check what the checkpoint holds, sample from
it; and the one-line errors of the engines that refuse an option."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY
from test_cli import check, run_cli, sample_three

from reptile_gen.inner_loop.core import unit_shape

TWO_STEPS = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]
DIGITS = ["task=digits", "model.body.hidden_sizes=[16,16]"]
TEXT = ["task=text", "task.max_len=24"]


@pytest.mark.parametrize(
    "args, sample_args, produced",
    [
        (
            [*DIGITS, "engine=lowrank", "algorithm.inner_lr_learned=per_unit"],
            ["complete=top_half"],
            "completion.png",
        ),
        (
            [*TEXT, "algorithm.inner_lr_learned=per_unit", "algorithm.inner_momentum=0.5"],
            ["prompt=Th"],
            "samples.txt",
        ),
    ],
    ids=["digits-lowrank-per_unit", "text-per_unit-momentum"],
)
def test_train_and_sample(tmp_path, args, sample_args, produced):
    run_dir = tmp_path / "run"
    check(run_cli(["-m", "reptile_gen.train", *TWO_STEPS, *args, f"hydra.run.dir={run_dir}"],
                  tmp_path))  # fmt: skip
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert any(k.startswith("test/nll_bits_per_") for k in metrics)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = {
        k.removeprefix("model."): v
        for k, v in state["state_dict"].items()
        if k.startswith("model.")
    }
    rates = {
        k.removeprefix("inner_lr.rates."): v
        for k, v in state["state_dict"].items()
        if k.startswith("inner_lr.rates.")
    }
    # one learned rate per output unit of every tensor: a weight (out, in) has (out, 1)
    assert rates and set(rates) == {k.replace(".", "__") for k in weights}
    for name, w in weights.items():
        assert rates[name.replace(".", "__")].shape == unit_shape(w.shape), name
    layer = next(k for k, w in weights.items() if w.dim() == 2 and "body" in k)
    assert rates[layer.replace(".", "__")].shape == (weights[layer].shape[0], 1)
    momentum = "inner_momentum=0.5" in " ".join(args)
    assert state["hyper_parameters"]["inner_momentum"] == (0.5 if momentum else 0.0)
    sample_three(ckpt, sample_args, produced, tmp_path)
