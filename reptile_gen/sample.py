"""Draw samples from a checkpoint: ``python -m reptile_gen.sample ckpt_path=<file>
[num_samples=16] [temperature=1.0] [seed=0] [prompt=...] [complete=top_half|left_half|random]
[path=auto|weights|lowrank] [overrides]`` (console script ``reptile-gen-sample``).

The checkpoint's model is rebuilt with the config saved by the run that wrote it, the
command-line overrides on top (exactly as ``python -m reptile_gen.eval`` does), and its
inner SGD loop is replayed as a generative model (:mod:`reptile_gen.sampling`). Outputs go
to a new run dir, ``outputs/sample/runs/<date>_<time>/``:

* text: ``samples.txt``, one sample per line, also printed; ``prompt=...`` is fed first;
* images: ``samples.png``, a grid; with ``complete=...`` the first ``num_samples`` test
  images are completed from their known pixels instead: ``completion.png``.

``.hydra/config.yaml`` there is the effective config (the saved one with the overrides)
and ``.hydra/sample_source.yaml`` records the checkpoint and the sampling options.

Only load checkpoints you trust: a ``.ckpt`` is a pickle.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from reptile_gen import CONF_DIR
from reptile_gen.cli import build_eval_config, hydra_subdir, source_record, with_run_groups
from reptile_gen.utils.config_compat import exit_on_moved_overrides
from reptile_gen.utils.runtime import ConfigError, check_checkpoint_matches, check_config
from reptile_gen.utils.user_errors import report_errors

__all__ = ["check_options", "sample", "main"]

log = logging.getLogger(__name__)

USAGE = (
    "python -m reptile_gen.sample ckpt_path=<run dir>/checkpoints/last.ckpt "
    "[num_samples=16] [temperature=1.0] [seed=0] [prompt=...] [complete=top_half] "
    "[path=auto|weights|lowrank]"
)


def check_options(cfg: DictConfig) -> dict:
    """The sampling options of the sample app's config, checked (clear errors)."""
    from reptile_gen.sampling import (
        COMPLETE_KINDS,
        SamplingError,
        check_num_samples,
        check_path,
        check_temperature,
    )

    if OmegaConf.is_missing(cfg, "ckpt_path") or cfg.get("ckpt_path") in (None, ""):
        raise ConfigError(f"ckpt_path is required: {USAGE}")
    complete = cfg.get("complete")
    if complete in ("", "null", "none"):
        complete = None
    if complete is not None and complete not in COMPLETE_KINDS:
        raise SamplingError(
            f"complete={complete!r}; allowed: {', '.join(COMPLETE_KINDS)} (or null: generate)"
        )
    fraction = cfg.get("complete_fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise SamplingError(f"complete_fraction={fraction!r}; must be a number in [0, 1]")
    if not 0 <= fraction <= 1:
        raise SamplingError(f"complete_fraction={fraction!r}; must be a number in [0, 1]")
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SamplingError(f"seed={seed!r}; must be an integer")
    prompt = cfg.get("prompt")
    path = check_path(cfg.get("path", "auto"))
    return {
        "num_samples": check_num_samples(cfg.get("num_samples", 16)),
        "temperature": check_temperature(cfg.get("temperature", 1.0)),
        "seed": seed,
        "prompt": "" if prompt is None else str(prompt),
        "complete": complete,
        "complete_fraction": float(fraction),
        "device": str(cfg.get("device") or "cpu"),
        "path": path,
    }


def _sample_text(module, options: dict, generator, out_dir: Path) -> dict:
    from reptile_gen.reports.text import write_text_samples
    from reptile_gen.sampling import generate_text

    texts = generate_text(
        module,
        options["num_samples"],
        options["temperature"],
        generator,
        options["prompt"],
        options["path"],
    )
    path = write_text_samples(texts, out_dir / "samples.txt")
    for text in path.read_text(encoding="utf-8").splitlines():
        print(text)
    return {"texts": texts, "files": [path]}


def _sample_images(module, datamodule, options: dict, generator, out_dir: Path) -> dict:
    from reptile_gen.reports.plots import save_completion_figure, save_image_grid
    from reptile_gen.sampling import (
        SamplingError,
        complete_images,
        completion_mask,
        generate_images,
    )

    n = options["num_samples"]
    side = datamodule.resolution
    if options["complete"] is None:
        order = datamodule.order_for(n, generator)
        images = generate_images(
            module, n, options["temperature"], generator, order, options["path"]
        )
        path = save_image_grid(images, out_dir / "samples.png")
        print(f"{n} images ({side}x{side}, {datamodule.pixel_order} pixel order): {path}")
        return {"images": images, "files": [path]}
    datamodule.setup("test")
    test = datamodule.bits["test"]
    if n > test.shape[0]:
        raise SamplingError(
            f"num_samples={n} but the test split has {test.shape[0]} image(s) to complete "
            f"(task.num_test_tasks={datamodule.num_test_tasks}); ask for fewer"
        )
    originals = test[:n].reshape(n, side, side)
    known = completion_mask(
        options["complete"], n, side, side, options["complete_fraction"], generator
    )
    order = datamodule.order_for(n, generator)
    completed = complete_images(
        module, originals, known, options["temperature"], generator, order, options["path"]
    )
    path = save_completion_figure(originals, known, completed, out_dir / "completion.png")
    unknown = ~known
    agree = (completed[unknown] == originals[unknown].to(completed.dtype)).float()
    accuracy = agree.mean().item() if agree.numel() else float("nan")
    print(
        f"completed {n} test images ({options['complete']}, {known.sum().item() / n:.0f} of "
        f"{side * side} pixels known); unknown pixels equal to the original: "
        f"{accuracy:.3f}: {path}"
    )
    return {
        "originals": originals,
        "known": known,
        "completed": completed,
        "unknown_pixel_accuracy": accuracy,
        "files": [path],
    }


def sample(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Sample from ``cfg.ckpt_path`` with its run's config plus ``overrides`` (default:
    the command line's); returns the samples, the files written (``files``) and the
    sampled ``module``."""
    options = check_options(cfg)
    eff, ckpt_path, run_cfg_path, checkpoint, overrides = build_eval_config(
        cfg, overrides, usage=USAGE
    )
    check_config(eff)
    import torch

    from reptile_gen.sampling import SamplingError, check_sampleable, sampling_path
    from reptile_gen.utils.instantiate import build_run

    out_dir = Path(eff.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    datamodule, module = build_run(eff)
    check_sampleable(module)
    sampling_path(module, options["path"])  # a path the module cannot take: an error now
    check_checkpoint_matches(checkpoint, module, ckpt_path, run_cfg_path)
    module.load_state_dict(checkpoint["state_dict"])
    del checkpoint
    module.to(torch.device(options["device"])).eval()
    hydra_dir = hydra_subdir(out_dir)
    if hydra_dir is not None:
        (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(eff))
        source = source_record(ckpt_path, run_cfg_path, overrides)
        source["sample_overrides"] = source.pop("eval_overrides")
        source["options"] = options
        (hydra_dir / "sample_source.yaml").write_text(OmegaConf.to_yaml(source))
    log.info("sampling %s (%s) into %s with %s", ckpt_path, run_cfg_path, out_dir, options)
    generator = torch.Generator().manual_seed(options["seed"])
    is_text = module.task_spec.kind == "text"
    if is_text and options["complete"] is not None:
        raise SamplingError(
            f"complete={options['complete']} is for image tasks (mnist, digits); a text "
            "checkpoint is conditioned with prompt=..."
        )
    if not is_text and options["prompt"]:
        raise SamplingError(
            "prompt=... is for text checkpoints; an image checkpoint is conditioned with "
            "complete=top_half|left_half|random"
        )
    if is_text:
        result = _sample_text(module, options, generator, out_dir)
    else:
        result = _sample_images(module, datamodule, options, generator, out_dir)
    for path in result["files"]:
        log.info("wrote %s", path)
    return {"out_dir": out_dir, "module": module, **result}


def _run(cfg: DictConfig) -> None:
    sample(cfg)


main = with_run_groups(
    exit_on_moved_overrides(
        hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")(
            report_errors(_run)
        )
    )
)
main.__doc__ = "Entry point of `python -m reptile_gen.sample` and `reptile-gen-sample`."


if __name__ == "__main__":
    main()
