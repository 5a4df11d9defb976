"""The sampler's ``path=auto|weights|lowrank`` through the real command lines: a digits run
trained on ``engine=lowrank`` (its end-of-run ``samples.png`` drawn on the ``auto`` path),
then ``python -m reptile_gen.sample`` on each path: the same images, generated and
completed; a bad value is one error line and exit 2."""

from __future__ import annotations

import pytest
import yaml
from conftest import TINY
from test_cli import check, run_cli

TWO_STEPS = [*TINY, "trainer.max_steps=2", "trainer.val_check_interval=2"]
DIGITS = ["task=digits", "model.body.hidden_sizes=[16,16]", "engine=lowrank"]


@pytest.fixture(scope="module")
def lowrank_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("lowrank") / "run"
    args = [*TWO_STEPS, *DIGITS, "algorithm=reptile", f"hydra.run.dir={run_dir}"]
    check(run_cli(["-m", "reptile_gen.train", *args], run_dir.parent))
    assert (run_dir / "samples.png").stat().st_size > 0
    return run_dir


@pytest.mark.parametrize("extra", [[], ["complete=left_half"]], ids=["generate", "complete"])
def test_every_path_draws_the_same_images(lowrank_run, tmp_path, extra):
    ckpt = lowrank_run / "checkpoints" / "last.ckpt"
    produced = "completion.png" if extra else "samples.png"
    images = {}
    for path in ("auto", "weights", "lowrank"):
        out_dir = tmp_path / path
        args = [f"ckpt_path={ckpt}", "num_samples=3", "seed=4", f"path={path}", *extra]
        check(run_cli(["-m", "reptile_gen.sample", *args, f"hydra.run.dir={out_dir}"], tmp_path))
        source = yaml.safe_load((out_dir / ".hydra" / "sample_source.yaml").read_text())
        assert source["options"]["path"] == path
        images[path] = (out_dir / produced).read_bytes()
    assert images["auto"] == images["weights"] == images["lowrank"]


def test_a_bad_path_is_one_error_line_and_exit_2(lowrank_run, tmp_path):
    ckpt = lowrank_run / "checkpoints" / "last.ckpt"
    args = [f"ckpt_path={ckpt}", "path=dense", f"hydra.run.dir={tmp_path / 'out'}"]
    proc = run_cli(["-m", "reptile_gen.sample", *args], tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: path='dense'; allowed: auto, weights, lowrank")
    assert "Traceback" not in proc.stderr
