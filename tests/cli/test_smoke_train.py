"""The real train() on a tiny composed config writes metrics.json and plots."""

import json

from reptile_gen.train import train


def test_train_writes_metrics_and_plots(make_cfg, tmp_path):
    cfg = make_cfg(["algorithm=maml"])
    metrics = train(cfg)
    out = tmp_path / "run"
    saved = json.loads((out / "metrics.json").read_text())
    assert "test/mse_step_10" in saved and "test/mse_step_10_ci95" in saved
    assert "test/random_init/mse_step_0" in saved
    assert saved["test/mse_step_10"] == metrics["test/mse_step_10"]
    assert (out / "learning_curve.png").stat().st_size > 0
    assert (out / "fit.png").stat().st_size > 0
    assert (out / "checkpoints" / "last.ckpt").is_file()


def test_last_checkpoint_is_the_final_state(make_cfg, tmp_path):
    """last.ckpt follows training, not the best validation score (Lightning's save_last
    alone would leave it at the last improvement)."""
    import torch

    cfg = make_cfg(["trainer.max_steps=5", "trainer.val_check_interval=2", "test=false"])
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 5
