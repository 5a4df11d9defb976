"""Sampling from SGD as a sequence model (reptile_gen.sampling, python -m reptile_gen.sample):
the sampler's dynamics are training's (teacher forcing reproduces the engine's online
losses), seeds decide samples, completion keeps the known pixels, the first element is
drawn from the model at theta_0, and the clear errors; the CLI once, as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, REPO_ROOT, compose_config
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from reptile_gen.reports.text import write_text_samples
from reptile_gen.sample import sample
from reptile_gen.sampling import (
    OnlineSampler,
    SamplingError,
    check_sampleable,
    complete,
    complete_images,
    completion_mask,
    generate_images,
    generate_text,
)
from reptile_gen.train import train
from reptile_gen.utils.instantiate import build_run

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["task=text", "task.max_len=24"]
DIGITS = ["task=digits", "model.body.hidden_sizes=[16,16]"]


def trained(tmp_path_factory, name: str, overrides: list[str]):
    """A tiny run trained in-process (as ``make_cfg`` + ``train``), with the config saved
    where ``python -m reptile_gen.train`` leaves it."""
    run_dir = tmp_path_factory.mktemp(name) / "run"
    cfg = compose_config(overrides, run_dir)
    train(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    return run_dir


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    # learned per-tensor inner rates: loaded from the checkpoint and used by the sampler
    return trained(
        tmp_path_factory,
        "text",
        [*TEXT, "algorithm=fomaml", "algorithm.inner_lr_learned=per_tensor"],
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return trained(tmp_path_factory, "digits", [*DIGITS, "algorithm=reptile"])


def compose_sample(overrides, output_dir):
    """The sample app's composition of ``overrides``, its run dir set to ``output_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("sample", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def module_of(tmp_path, overrides, double=False):
    precision = ["trainer.precision=64-true"] if double else []
    cfg = compose_config([*overrides, *precision], tmp_path / "built")
    return build_run(cfg)


# ---------------------------------------------------------------------- dynamics
@pytest.mark.parametrize(
    "overrides",
    [
        [*TEXT, "algorithm.inner_lr_learned=per_parameter"],
        [*DIGITS, "algorithm.inner_lr_learned=scalar", "algorithm.inner_batch_size=3"],
        [*DIGITS, "task.pixel_order=random", "algorithm.inner_lr_learned=per_tensor"],
        [*TEXT, "algorithm.inner_lr_learned=per_step", "algorithm.inner_lr_schedule=linear"],
        [
            *DIGITS,
            "algorithm.inner_lr_learned=per_layer_per_step",
            "algorithm.inner_lr_buckets=5",
            "algorithm.inner_lr_schedule=[1.0,0.5,0.25]",
            "algorithm.inner_batch_size=3",
        ],
        [*TEXT, "algorithm.inner_lr_learned=per_unit", "algorithm.inner_momentum=0.5"],
        [*DIGITS, "algorithm.inner_momentum=0.7", "algorithm.inner_batch_size=3"],
    ],
    ids=[
        "text-per_parameter",
        "digits-scalar-batch3",
        "digits-random-order-per_tensor",
        "text-per_step-linear",
        "digits-per_layer_per_step-list-batch3",
        "text-per_unit-momentum",
        "digits-momentum-batch3",
    ],
)
def test_teacher_forcing_reproduces_the_engine_online_losses(tmp_path, overrides):
    """Feeding a sequence through the sampler's steps is training's inner loop: the same
    online element losses as the functional engine (float64), learned rates included (per
    step, per unit and scheduled ones too), and inner momentum (padded text lines: a step
    past a line's end moves neither weights nor velocity)."""
    datamodule, module = module_of(tmp_path, overrides, double=True)
    generator = torch.Generator().manual_seed(1)
    for rates in module.inner_lr.parameters():  # learned rates far from their init
        rates.data = 0.02 + 0.2 * torch.rand(rates.shape, generator=generator).double()
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    with torch.enable_grad():
        run = module.adapt(batch, "none", module.eval_schedule, return_adapted=True)
    expected = run.element_losses
    result = OnlineSampler(module).feed(batch.support_x, batch.support_y, batch.support_mask)
    losses = result.element_losses(module.task_spec)
    assert losses.dtype == torch.float64
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-12)
    assert expected.sum() > 0
    # and the weights at the end (past a padded line's end too)
    for name, phi in run.adapted.items():
        torch.testing.assert_close(result.params[name], phi, rtol=1e-10, atol=1e-12, msg=name)


def test_first_element_is_drawn_from_the_model_at_theta0(tmp_path):
    datamodule, module = module_of(tmp_path, DIGITS)
    sampler = OnlineSampler(module, temperature=1.0)
    coords = datamodule.coords
    with torch.no_grad():
        logit = module.model(coords[:1]).reshape(()).item()
    # the first step's draws are Bernoulli(sigmoid(logit)) at theta_0
    n = 4000
    params = sampler.initial_params(n)
    x = coords[:1].expand(n, 1, 2)
    noise = torch.rand(n, 1, 1, generator=torch.Generator().manual_seed(0))
    zeros = torch.zeros(n, 1)
    _, y, _, logits, _ = sampler.step(params, x, zeros, zeros.bool(), ~zeros.bool(), noise)
    torch.testing.assert_close(logits[:, 0, 0], torch.full((n,), logit))
    p = torch.sigmoid(torch.tensor(logit)).item()
    assert abs(y.float().mean().item() - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3
    # at a small temperature the draw is the most likely element
    cold = OnlineSampler(module, temperature=1e-6)
    _, y, _, _, _ = cold.step(params, x, zeros, zeros.bool(), ~zeros.bool(), noise)
    assert (y == float(logit > 0)).all()
    images = generate_images(module, 3, 1e-6, torch.Generator().manual_seed(5))
    assert (images[:, 0, 0] == float(logit > 0)).all()

    # text: the first byte's distribution is the model's at position 0; cold, its argmax
    _, text_module = module_of(tmp_path, TEXT)
    with torch.no_grad():
        expected = text_module.model(torch.zeros(1, dtype=torch.long)).reshape(-1)
    result = OnlineSampler(text_module, 1e-6).run(
        torch.arange(24).expand(3, -1), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(result.logits[:, 0], expected.expand(3, -1))
    assert (result.y[:, 0] == expected.argmax()).all() and result.mask[:, 0].all()


# ---------------------------------------------------------------------- seeds
def test_same_seed_same_samples_other_seed_other_samples(text_run, digits_run):
    from reptile_gen.eval import load_checkpoint

    for run_dir, make in ((text_run, generate_text), (digits_run, generate_images)):
        cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        _, module = build_run(cfg)
        module.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"])

        def draw(seed, make=make, module=module):
            return make(module, 6, 1.0, torch.Generator().manual_seed(seed))

        a, b, c = draw(0), draw(0), draw(1)
        if torch.is_tensor(a):
            assert torch.equal(a, b) and not torch.equal(a, c)
            assert a.shape == (6, 8, 8) and set(a.unique().tolist()) <= {0.0, 1.0}
        else:
            assert a == b and a != c and len(a) == 6


# ---------------------------------------------------------------------- conditioning
@pytest.mark.parametrize("kind", ["top_half", "left_half", "random"])
def test_completion_keeps_the_known_pixels(tmp_path, kind):
    datamodule, module = module_of(tmp_path, [*DIGITS, "task.pixel_order=random"])
    datamodule.setup("test")
    images = datamodule.bits["test"][:4].reshape(4, 8, 8)
    generator = torch.Generator().manual_seed(0)
    known = completion_mask(kind, 4, 8, 8, 0.3, generator)
    expected_known = {"top_half": 32, "left_half": 32, "random": round(0.3 * 64)}[kind]
    assert (known.reshape(4, -1).sum(1) == expected_known).all()
    order = datamodule.order_for(4, generator)
    completed = complete_images(module, images, known, 1.0, generator, order)
    assert completed.shape == images.shape
    assert torch.equal(completed[known], images[known].to(completed.dtype))
    assert set(completed.unique().tolist()) <= {0.0, 1.0}
    # same seed, same completion
    generator = torch.Generator().manual_seed(0)
    known2 = completion_mask(kind, 4, 8, 8, 0.3, generator)
    again = complete_images(
        module, images, known2, 1.0, generator, datamodule.order_for(4, generator)
    )
    assert torch.equal(known, known2) and torch.equal(completed, again)


def test_complete_takes_any_subset_in_any_order(tmp_path):
    """Different known sets per sample, any order; the known pixels are fed first (so
    the drawn ones come from the model adapted on them)."""
    _, module = module_of(tmp_path, DIGITS)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], -1)
    generator = torch.Generator().manual_seed(3)
    perms = [torch.randperm(64, generator=generator) for _ in range(3)]
    sizes = [5, 40, 0]
    known = [coords[p[:k]] for p, k in zip(perms, sizes)]
    bits = [torch.randint(0, 2, (k,), generator=generator).float() for k in sizes]
    unknown = [coords[p[k : k + 10]] for p, k in zip(perms, sizes)]
    drawn = complete(module, known, bits, unknown, 1.0, torch.Generator().manual_seed(0))
    assert [d.shape[0] for d in drawn] == [10, 10, 10]
    # tensors in, a tensor out; cold sampling after the known pixels equals feeding them
    # and then drawing from the adapted model
    ck, bk, cu = coords[None, :6], torch.ones(1, 6), coords[None, 6:9]
    out = complete(module, ck, bk, cu, 1e-6)
    assert out.shape == (1, 3)
    sampler = OnlineSampler(module, 1e-6)
    fed = sampler.feed(ck, bk)
    rest = sampler.run(cu, params=fed.params)
    assert torch.equal(out, rest.y)


def test_a_continued_run_with_momentum_carries_the_velocity(tmp_path):
    """With inner momentum the sampler's state is the weights and their velocities: a
    run continued from both equals one run; from the weights alone it is an error."""
    _, module = module_of(tmp_path, [*DIGITS, "algorithm.inner_momentum=0.5"], double=True)
    rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()], -1).expand(2, -1, -1)
    bits = torch.randint(0, 2, (2, 64), generator=torch.Generator().manual_seed(0)).double()
    sampler = OnlineSampler(module)
    whole = sampler.feed(coords, bits)
    first = sampler.feed(coords[:, :20], bits[:, :20])
    assert first.velocity is not None and whole.velocity is not None
    rest = sampler.feed(coords[:, 20:], bits[:, 20:], params=first.params, velocity=first.velocity)
    torch.testing.assert_close(rest.logits, whole.logits[:, 20:], rtol=1e-12, atol=1e-12)
    for name, p in whole.params.items():
        torch.testing.assert_close(rest.params[name], p, rtol=1e-12, atol=1e-12)
    with pytest.raises(SamplingError, match=r"params given without their velocity"):
        sampler.feed(coords[:, 20:], bits[:, 20:], params=first.params)
    assert OnlineSampler(module_of(tmp_path, DIGITS)[1]).feed(coords, bits).velocity is None


def test_prompt_is_fed_first_and_too_long_a_prompt_is_a_clear_error(tmp_path):
    _, module = module_of(tmp_path, TEXT)
    texts = generate_text(module, 3, 1.0, torch.Generator().manual_seed(0), prompt="The ")
    assert all(t.startswith("The ") for t in texts) and len(texts) == 3
    generate_text(module, 1, 1.0, prompt="x" * 23)  # max_len - 1 bytes: fits
    with pytest.raises(
        SamplingError, match=r"prompt is 24 bytes long but the model's max_len is 24"
    ):
        generate_text(module, 1, 1.0, prompt="x" * 24)
    with pytest.raises(SamplingError, match="temperature=0; must be a number > 0"):
        generate_text(module, 1, 0)
    with pytest.raises(SamplingError, match="num_samples=0; must be an integer >= 1"):
        generate_text(module, 0, 1.0)


# ---------------------------------------------------------------------- clear errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=sine"], "sampling needs a sequence task: text, mnist or digits"),
        (
            [*DIGITS, "engine=higher", "engine.inner_optimizer.name=adam"],
            r"inner optimizer is algorithm.inner_optimizer=\{name: adam\}.*plain SGD",
        ),
        ([*DIGITS, "algorithm=lstm"], "cannot sample a LSTMBaseline checkpoint"),
    ],
    ids=["sine", "higher-adam", "lstm"],
)
def test_unsampleable_modules_are_clear_errors(tmp_path, overrides, message):
    _, module = module_of(tmp_path, overrides)
    with pytest.raises(SamplingError, match=message):
        check_sampleable(module)


def test_higher_engine_with_plain_sgd_is_sampled(tmp_path):
    _, module = module_of(tmp_path, [*DIGITS, "engine=higher"])
    check_sampleable(module)


def test_sample_app_on_a_sine_checkpoint_is_a_clear_error(tmp_path):
    """A sine run's checkpoint (its weights saved untrained: only the task matters)."""
    run_dir = tmp_path / "sine"
    cfg = compose_config(["task=sine"], run_dir)
    _, module = build_run(cfg)
    (run_dir / "checkpoints").mkdir()
    torch.save({"state_dict": module.state_dict()}, run_dir / "checkpoints" / "last.ckpt")
    with open_dict(cfg):
        del cfg["hydra"]
    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    cfg = compose_sample([f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"], tmp_path / "s")
    with pytest.raises(
        SamplingError, match="sampling needs a sequence task: text, mnist or digits"
    ):
        sample(cfg)


# ---------------------------------------------------------------------- entry point
def test_sample_app_images_and_completion(digits_run, tmp_path):
    ckpt = digits_run / "checkpoints" / "last.ckpt"
    out = sample(compose_sample([f"ckpt_path={ckpt}", "num_samples=5", "seed=2"], tmp_path / "a"))
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0
    assert (tmp_path / "a" / ".hydra" / "sample_source.yaml").is_file()
    assert out["images"].shape == (5, 8, 8)
    generator = torch.Generator().manual_seed(2)  # the app's draws are the library's
    expected = generate_images(out["module"], 5, 1.0, generator)
    assert torch.equal(out["images"], expected)
    cfg = compose_sample(
        [f"ckpt_path={ckpt}", "num_samples=3", "complete=top_half"], tmp_path / "c"
    )
    done = sample(cfg)
    assert (tmp_path / "c" / "completion.png").stat().st_size > 0
    assert torch.equal(done["completed"][:, :4], done["originals"][:, :4].to(torch.float32))
    cfg = compose_sample([f"ckpt_path={ckpt}", "num_samples=9", "complete=random"], tmp_path / "d")
    with pytest.raises(SamplingError, match="num_samples=9 but the test split has 4 image"):
        sample(cfg)
    cfg = compose_sample([f"ckpt_path={ckpt}", "temperature=-1"], tmp_path / "e")
    with pytest.raises(SamplingError, match="temperature=-1"):
        sample(cfg)


def test_write_report_writes_samples_at_test_end(text_run, digits_run):
    lines = (text_run / "samples.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 8
    assert (digits_run / "samples.png").stat().st_size > 0


def test_cli_text_samples(text_run, tmp_path):
    out_dir = tmp_path / "sample"
    ckpt = text_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "num_samples=2", "prompt=Th", f"hydra.run.dir={out_dir}"]
    proc = subprocess.run(
        [sys.executable, "-m", "reptile_gen.sample", *args],
        cwd=REPO_ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = (out_dir / "samples.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(line.startswith("Th") for line in lines)
    assert all(line in proc.stdout for line in lines)
    config = OmegaConf.load(out_dir / ".hydra" / "config.yaml")
    assert config.task.max_len == 24 and config.task_name == "sample"
    # the console script finds the sample app's config too (--cfg job: compose and print)
    script = Path(sys.executable).parent / "reptile-gen-sample"
    proc = subprocess.run(
        [str(script), f"ckpt_path={ckpt}", "num_samples=3", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "task_name: sample" in proc.stdout and "num_samples: 3" in proc.stdout


def test_samples_txt_has_one_line_per_sample(tmp_path):
    texts = ["two\nlines", "file\x1cseparator and \u2028", "back\\slash\ttab", ""]
    path = write_text_samples(texts, tmp_path / "samples.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines == ["two\\nlines", "file\\x1cseparator and \\u2028", "back\\\\slash\ttab", ""]
    assert [line.encode().decode("unicode_escape") for line in lines] == texts


def test_a_diverging_sample_stops_with_the_element_and_samples(tmp_path):
    """A replayed inner SGD that blows up (a huge inner rate) is a divergence naming the
    element and the samples, not a silent draw from non-finite predictions."""
    from reptile_gen.inner_loop.core.guard import Diverged

    datamodule, module = module_of(tmp_path, DIGITS)
    with torch.no_grad():
        module.inner_lr.init = 1e30
    sampler = OnlineSampler(module, temperature=1.0)
    x = datamodule.coords[None].expand(3, -1, -1)
    with pytest.raises(
        Diverged,
        match=r"non-finite prediction while sampling; at element \d+ of samples \[0, 1, 2\]; inner rates inner_lr=1e\+30",
    ):
        sampler.run(x, generator=torch.Generator().manual_seed(0))
