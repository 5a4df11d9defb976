"""``model.head_bias=prior``: the untrained model predicts the training targets' marginal."""

from __future__ import annotations

import math

import pytest
import torch

from reptile_gen.utils.instantiate import build_run


def test_text_prior_makes_the_untrained_head_a_unigram_model(make_cfg):
    cfg = make_cfg(["task=text", "task.max_len=12", "model.head_bias=prior"])
    datamodule, module = build_run(cfg)
    bias = module.model.head.bias.detach()
    prior = datamodule.output_prior()
    assert torch.equal(bias, prior)
    assert math.isclose(prior.exp().sum().item(), 1.0, rel_tol=1e-5)
    # the commonest byte of English prose is the space
    assert int(prior.argmax()) == ord(" ")


def test_image_prior_is_the_on_pixel_log_odds(make_cfg):
    cfg = make_cfg(["task=digits", "model.head_bias=prior"])
    datamodule, module = build_run(cfg)
    p = datamodule.bits["train"].mean()
    assert module.model.head.bias.item() == pytest.approx(math.log(p / (1 - p)), rel=1e-5)


def test_default_keeps_pytorch_init(make_cfg):
    cfg = make_cfg(["task=text", "task.max_len=12"])
    _, a = build_run(cfg)
    _, b = build_run(make_cfg(["task=text", "task.max_len=12", "model.head_bias=prior"]))
    assert not torch.equal(a.model.head.bias, b.model.head.bias)
    # everything else is initialised identically (same seed, same order)
    assert torch.equal(a.model.head.weight, b.model.head.weight)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.head_bias=zero"], "model.head_bias='zero'; allowed: default, prior"),
        (["model.head_bias=prior"], "model.head_bias=prior with task SineDataModule"),
    ],
)
def test_bad_head_bias_is_a_clear_error(make_cfg, overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build_run(make_cfg(overrides))
