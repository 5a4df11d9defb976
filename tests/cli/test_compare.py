"""reptile_gen.compare on synthetic run dirs: discovery, labels, seed groups, table, chart."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from reptile_gen.compare import (
    CompareError,
    compare,
    find_metrics,
    format_table,
    group_runs,
    load_run,
    main,
)

STEPS = 11


def write_run(
    run_dir,
    curve,
    overrides=(),
    seed=0,
    algorithm="reptile_gen.algorithms.MAML",
    first_order=False,
    random_init=None,
    choices=None,
    metric="mse",
):
    """A run dir as train writes it: metrics.json and .hydra/{config,overrides,hydra}.yaml."""
    run_dir.mkdir(parents=True)
    metrics = {f"test/{metric}_step_{k}": v for k, v in enumerate(curve)}
    metrics |= {f"test/{metric}_step_{k}_ci95": 0.1 for k in range(len(curve))}
    if random_init is not None:
        metrics |= {f"test/random_init/{metric}_step_{k}": v for k, v in enumerate(random_init)}
    metrics["fit_seconds"] = 1.0
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir()
    config = {
        "seed": seed,
        "algorithm": {"_target_": algorithm, "first_order": first_order, "inner_lr": 0.01},
    }
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    hydra_yaml = {"hydra": {"runtime": {"choices": choices or {"algorithm": "maml"}}}}
    (hydra_dir / "hydra.yaml").write_text(yaml.safe_dump(hydra_yaml))
    return run_dir


def line(start, slope):
    return [start - slope * k for k in range(STEPS)]


def make_sweep(root):
    """A multirun: 2 algorithms x 2 seeds, with common tiny overrides."""
    common = ["trainer.max_steps=3", "logger=none", "hydra.run.dir=x"]
    job = 0
    for algo, start in (("maml", 3.0), ("reptile", 2.0)):
        for seed in (0, 1):
            write_run(
                root / str(job),
                line(start + seed, 0.1),
                overrides=[*common, f"algorithm={algo}", f"seed={seed}"],
                seed=seed,
                algorithm=f"reptile_gen.algorithms.{'MAML' if algo == 'maml' else 'Reptile'}",
                random_init=[5.0 + seed] * STEPS,
                choices={"algorithm": algo},
            )
            job += 1
    return root


def test_groups_seeds_under_the_varying_override(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    runs = [load_run(p) for p in find_metrics([sweep])]
    assert len(runs) == 4
    groups, baselines = group_runs(runs)
    assert [g.label for g in groups] == ["algorithm=maml", "algorithm=reptile"]
    maml = groups[0]
    assert maml.n == 2 and sorted(maml.seeds) == [0, 1]
    # seeds 0 and 1 start at 3.0 and 4.0: mean 3.5, sample std 1/sqrt(2)
    assert maml.mean[0] == pytest.approx(3.5)
    assert maml.std[0] == pytest.approx(math.sqrt(0.5))
    assert maml.mean[10] == pytest.approx(2.5)
    assert len(maml.mean) == STEPS
    (baseline,) = baselines
    assert baseline.label == "random init"
    assert baseline.n == 4 and baseline.mean[0] == pytest.approx(5.5)


def test_label_falls_back_to_the_algorithm(tmp_path):
    # no override tells the runs apart: labelled by the config's algorithm (FOMAML is MAML
    # with first_order), a single seed each
    write_run(tmp_path / "a", line(3, 0.1), overrides=["seed=0"])
    write_run(tmp_path / "b", line(3, 0.2), overrides=["seed=0"], first_order=True)
    write_run(tmp_path / "c", line(2, 0.1), algorithm="reptile_gen.algorithms.JointTraining")
    runs = [load_run(p) for p in find_metrics([tmp_path])]
    groups, baselines = group_runs(runs)
    from reptile_gen.algorithms import MAML, JointTraining
    from reptile_gen.compare import display_name

    maml, joint = display_name(MAML), display_name(JointTraining)
    assert sorted(g.label for g in groups) == sorted(["first-order MAML", joint, maml])
    assert (maml, joint) == ("MAML", "joint (transfer)")
    assert all(g.n == 1 and g.std[0] == 0.0 for g in groups)
    assert baselines == []


def test_missing_key_takes_the_runs_choice(tmp_path):
    # one run used the default algorithm (no override): its value comes from hydra.yaml
    write_run(tmp_path / "a", line(3, 0.1), overrides=[], choices={"algorithm": "maml"})
    write_run(
        tmp_path / "b",
        line(2, 0.1),
        overrides=["algorithm=reptile"],
        algorithm="reptile_gen.algorithms.Reptile",
        choices={"algorithm": "reptile"},
    )
    runs = [load_run(p) for p in find_metrics([tmp_path / "a", tmp_path / "b"])]
    groups, _ = group_runs(runs)
    assert [g.label for g in groups] == ["algorithm=maml", "algorithm=reptile"]


def test_eval_run_inherits_its_source_overrides(tmp_path):
    src = write_run(tmp_path / "train", line(3, 0.1), overrides=["algorithm=reptile"])
    ev = write_run(
        tmp_path / "eval", line(2, 0.1), overrides=["ckpt_path=x", "task.num_test_tasks=6"]
    )
    source = {
        "run_dir": str(src),
        "run_overrides": ["algorithm=reptile", "trainer.max_steps=3"],
        "run_choices": {"algorithm": "reptile", "trainer": "default"},
        "eval_overrides": ["ckpt_path=x", "task.num_test_tasks=6", "trainer=cpu"],
    }
    (ev / ".hydra" / "eval_source.yaml").write_text(yaml.safe_dump(source))
    run = load_run(ev / "metrics.json")
    assert run.overrides["algorithm"] == "reptile"
    assert run.overrides["task.num_test_tasks"] == "6"
    assert run.choices["trainer"] == "cpu"


def test_table_json_and_chart(tmp_path, capsys):
    sweep = make_sweep(tmp_path / "sweep")
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "algorithm=maml" in printed and "random init" in printed
    chart = sweep / "comparison.png"
    assert chart.stat().st_size > 0
    md = (sweep / "comparison.md").read_text()
    assert "| label" in md and "MSE@0" in md and "MSE@10" in md
    assert "3.5 ± 0.71" in md  # maml at step 0: mean and spread over its two seeds
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["metric"] == "mse" and summary["steps"] == [0, 1, 10]
    maml = summary["groups"][0]
    assert maml["label"] == "algorithm=maml" and maml["n"] == 2
    assert maml["at_steps"]["10"]["mean"] == pytest.approx(2.5)
    assert [b["n"] for b in summary["random_init"]] == [4]


def test_out_and_steps_options(tmp_path):
    sweep = make_sweep(tmp_path / "sweep")
    out = tmp_path / "charts" / "chart.png"
    summary = compare([sweep], out=out, steps=[0, 5, 20], log_y=False)
    assert out.is_file() and (out.parent / "comparison.md").is_file()
    assert (out.parent / "comparison.json").is_file()
    assert summary["groups"][0]["at_steps"]["20"] is None  # past the curve: shown as —
    assert "—" in summary["table"]


def test_table_format():
    from reptile_gen.compare import Group

    group = Group("algorithm=maml", [], [1.0, 0.5], [0.1, 0.05])
    table = format_table([group], [], "mse", [0, 1])
    header, sep, row = table.splitlines()
    assert header.split("|")[1].strip() == "label" and "MSE@1" in header
    assert set(sep) <= {"|", "-"}
    assert "1 ± 0.1" in row and "0.5 ± 0.05" in row


def test_random_init_baselines_per_model_family(tmp_path):
    """The LSTM baseline's untrained network and the meta-learners' MLP are different
    random initialisations: one baseline each, labelled by family, never averaged."""
    for job, (algo, start, init) in enumerate((("maml", 3.0, 5.0), ("lstm", 2.0, 9.0))):
        for seed in (0, 1):
            write_run(
                tmp_path / f"{job}{seed}",
                line(start + seed, 0.1),
                overrides=[f"algorithm={algo}", f"seed={seed}"],
                seed=seed,
                algorithm="reptile_gen.algorithms.MAML"
                if algo == "maml"
                else "reptile_gen.algorithms.LSTMBaseline",
                random_init=[init + seed] * STEPS,
                choices={"algorithm": algo, "model": "mlp"},
            )
    groups, baselines = group_runs([load_run(p) for p in find_metrics([tmp_path])])
    assert len(groups) == 2
    by_label = {b.label: b for b in baselines}
    assert set(by_label) == {"random init (mlp)", "random init (lstm)"}
    assert by_label["random init (mlp)"].mean[0] == pytest.approx(5.5)
    assert by_label["random init (lstm)"].mean[0] == pytest.approx(9.5)
    assert by_label["random init (lstm)"].std[0] == pytest.approx(math.sqrt(0.5))
    summary = compare_main_summary(tmp_path)
    assert sorted(b["label"] for b in summary["random_init"]) == sorted(by_label)


def compare_main_summary(root):
    """``comparison.json`` of ``python -m reptile_gen.compare root``."""
    from reptile_gen.compare import main

    main([str(root)])
    return json.loads((root / "comparison.json").read_text())


def test_null_values_are_left_out(tmp_path):
    curve = line(3, 0.1)
    write_run(tmp_path / "a", curve, overrides=["seed=0"])
    b = write_run(tmp_path / "b", curve, overrides=["seed=1"], seed=1)
    metrics = json.loads((b / "metrics.json").read_text())
    metrics["test/mse_step_3"] = None  # a NaN written by write_metrics
    (b / "metrics.json").write_text(json.dumps(metrics))
    groups, _ = group_runs([load_run(p) for p in find_metrics([tmp_path])])
    assert groups[0].n == 2 and groups[0].mean[3] == pytest.approx(curve[3])


def test_no_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompareError, match="no metrics.json found below"):
        compare([tmp_path / "empty"])
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "empty")])
    assert exc.value.code == 2
    assert "no metrics.json found" in capsys.readouterr().err
    with pytest.raises(CompareError, match="no such directory"):
        find_metrics([tmp_path / "missing"])


def test_unknown_metric_lists_the_available_ones(tmp_path):
    write_run(tmp_path / "a", line(3, 0.1), metric="nll")
    with pytest.raises(CompareError, match="no run has the metric 'mse'.*curves: nll"):
        compare([tmp_path], metric="mse")


def test_sequence_runs_compare_their_likelihood(tmp_path, capsys):
    """A sequence task has one likelihood per run, no curve: ``--metric auto`` picks bits
    per pixel, one bar and one column per group; a job dir without metrics.json (a failed
    job) is named, not counted."""
    sweep = tmp_path / "sweep"
    runs = [("maml", 0, 0.5), ("maml", 1, 0.6), ("lstm", 0, 0.4), ("lstm", 1, 0.42)]
    for job, (algo, seed, bits) in enumerate(runs):
        run_dir = write_run(
            sweep / str(job),
            [],
            overrides=["task=digits", f"algorithm={algo}", f"seed={seed}"],
            seed=seed,
            choices={"algorithm": algo},
        )
        metrics = {
            "test/nll_bits_per_pixel": bits,
            "test/nll_nats_per_image": bits * 64,
            "test/nll_nats_per_image_ci95": 0.1,
            "test/random_init/nll_bits_per_pixel": 0.9 + 0.02 * job,
            "data/source": "sklearn:digits",
        }
        (run_dir / "metrics.json").write_text(json.dumps(metrics))
    failed = sweep / "4"
    (failed / ".hydra").mkdir(parents=True)
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr()
    assert "| nll_bits_per_pixel |" in printed.out and "0.55 ± 0.071" in printed.out
    assert f"not counted (no metrics.json: failed or unfinished): {failed}" in printed.err
    summary = json.loads((sweep / "comparison.json").read_text())
    assert summary["kind"] == "value" and summary["metric"] == "nll_bits_per_pixel"
    assert [(g["label"], g["n"]) for g in summary["groups"]] == [
        ("algorithm=maml", 2),
        ("algorithm=lstm", 2),
    ]
    assert summary["groups"][1]["mean"] == [pytest.approx(0.41)]
    assert [b["mean"] for b in summary["random_init"]] == [[pytest.approx(0.93)]]
    assert summary["without_metrics"] == [str(failed)]
    assert (sweep / "comparison.png").stat().st_size > 0
    other = compare([sweep], out=tmp_path / "nats" / "c.png", metric="nll_nats_per_image")
    assert other["groups"][0]["mean"] == [pytest.approx(0.55 * 64)]
    with pytest.raises(CompareError, match="values: nll_bits_per_pixel, nll_nats_per_image"):
        compare([sweep], metric="mse")
