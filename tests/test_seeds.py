"""`--seeds`: a run repeated over seeds of everything after the teacher, the shared part made once,
the report aggregated (mean, std, per-seed values), a failing seed not losing the others."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import yaml

from cast.cli import main
from cast.pipeline import runner
from cast.pipeline.report import spread
from cast.pipeline.seeds import aggregate_rows, parse_seeds, seeds_summary
from cast.runs import STAGES, RunFolder
from test_pipeline import write_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    config = write_config(root)
    # A plain run first, as `make demo` leaves one: the seeds reuse its teacher stages.
    assert main(["run", "--config", str(config)]) == 0
    teacher = {p: p.stat().st_mtime_ns for p in (root / "runs" / "tiny" / "stages").rglob("model.safetensors")
               if p.parts[-3].startswith("teacher_")}
    assert main(["run", "--config", str(config), "--seeds", "0,1"]) == 0
    assert len(teacher) == 2 and {p: p.stat().st_mtime_ns for p in teacher} == teacher
    return config, root / "runs" / "tiny"


@pytest.mark.slow
def test_each_seed_runs_after_the_shared_teacher_and_the_report_aggregates(seeded):
    _, run_dir = seeded
    shared = RunFolder(run_dir)  # the teacher stages where a plain run of seed 0 put them, trained once
    assert set(shared.available_models()) >= {"teacher_adaptation", "teacher_self_training"}
    per_seed = {}
    for seed in (0, 1):
        folder = RunFolder(run_dir / f"seed_{seed}")
        assert folder.available_models() == ["knowledge_transfer", "student_refinement", "student_supervised"]
        config = yaml.safe_load(folder.config.read_text())
        assert (config["seed"], config["teacher_seed"], config["shared_dir"]) == (seed, 0, str(shared.root))
        per_seed[seed] = {r["model"]: r for r in json.loads(folder.report_json.read_text())["rows"]}
    # the seeds share the teacher (same rows) and differ after it
    for key in ("teacher_zero_shot", "teacher_adaptation", "teacher_self_training"):
        assert per_seed[0][key]["AP"] == per_seed[1][key]["AP"]
    settings = [json.loads((run_dir / f"seed_{s}" / "stages" / "student_supervised" / "summary.json").read_text())
                ["settings"] for s in (0, 1)]
    assert settings[0]["seed"] != settings[1]["seed"] and settings[0]["initial_weights"] != settings[1]["initial_weights"]

    report = json.loads((run_dir / "report.json").read_text())
    assert report["seeds"] == [0, 1] and report["failed_seeds"] == {}
    for row in report["rows"]:
        values = [per_seed[s][row["model"]]["AP"] for s in (0, 1)]
        assert row["AP_seeds"] == {"0": values[0], "1": values[1]}
        assert row["AP"] == pytest.approx(statistics.fmean(values), abs=0.006)
        assert row["AP_std"] == pytest.approx(statistics.stdev(values), abs=0.006)
        assert {"name", "model", "AP50", "params_m"} <= set(row)
    md = (run_dir / "report.md").read_text()
    assert "±" in md and "AP per seed" in md and "(mean over seeds 0, 1)" in md


@pytest.mark.slow
def test_a_second_seeded_run_reuses_everything(seeded):
    config, run_dir = seeded
    models = {p: p.stat().st_mtime_ns for p in run_dir.rglob("model.safetensors")}
    assert len(models) == 2 + 3 + 2 * 3  # 1a, 1b and the students of the plain run; three per seed
    assert main(["run", "--config", str(config), "--seeds", "0,1"]) == 0
    assert {p: p.stat().st_mtime_ns for p in models} == models


@pytest.mark.slow
def test_a_failing_seed_does_not_lose_the_others(seeded, monkeypatch, capsys):
    config, run_dir = seeded
    real = runner.Pipeline.run

    def flaky(self, stop_after=None):
        if self.cfg.seed == 1:
            raise RuntimeError("injected failure")
        return real(self, stop_after)

    monkeypatch.setattr(runner.Pipeline, "run", flaky)
    assert main(["run", "--config", str(config), "--seeds", "0,1", "--name", "flaky"]) == 1
    report = json.loads((run_dir.parent / "flaky" / "report.json").read_text())
    assert report["seeds"] == [0, 1] and report["failed_seeds"] == {"1": "RuntimeError: injected failure"}
    assert all(row["AP_seeds"].keys() == {"0"} for row in report["rows"])
    md = (run_dir.parent / "flaky" / "report.md").read_text()
    assert "Seed 1 failed: RuntimeError: injected failure" in md
    assert "(mean over seeds 0)" in md and "seeds 0, 1" not in md  # the mean is not over the failed seed


@pytest.mark.slow
def test_an_ablation_over_seeds_aggregates_its_table(seeded):
    config, run_dir = seeded
    assert main(["ablate", "--config", str(config), "--study", "samplers", "--seeds", "0,1"]) == 0
    table = json.loads((run_dir / "ablations" / "samplers.json").read_text())
    per_seed = [json.loads((run_dir / f"seed_{s}" / "ablations" / "samplers.json").read_text()) for s in (0, 1)]
    for i, row in enumerate(table["rows"]):
        values = [t["rows"][i]["AP"] for t in per_seed]
        assert row["AP_seeds"] == {"0": values[0], "1": values[1]}
        assert row["AP"] == pytest.approx(statistics.fmean(values), abs=0.006)
    assert "mean ± std over seeds 0, 1" in (run_dir / "ablations" / "samplers.md").read_text()
    for folder in (run_dir, run_dir / "seed_0"):  # the diagnostics per sampler: mean over the seeds, and each seed's
        assert (folder / "ablations" / "samplers.png").read_bytes()[:4] == b"\x89PNG"



@pytest.mark.slow
def test_the_label_fraction_study_over_seeds_shares_each_fractions_teacher_and_draws_the_mean(seeded):
    config, run_dir = seeded
    assert main(["ablate", "--config", str(config), "--study", "label_fraction", "--seeds", "0,1",
                 "--set", "ablations.label_fractions=[0.5, 0.25]"]) == 0
    shared = RunFolder(run_dir / "ablations" / "label_fraction" / "fraction_0.5")  # trained once
    assert shared.available_models() == ["teacher_adaptation", "teacher_self_training"]
    for seed in (0, 1):
        sub = RunFolder(run_dir / f"seed_{seed}" / "ablations" / "label_fraction" / "fraction_0.5")
        assert sub.available_models() == ["knowledge_transfer", "student_refinement", "student_supervised"]
    table = json.loads((run_dir / "ablations" / "label_fraction.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["50 % labeled", "25 % labeled"] and table["seeds"] == [0, 1]
    assert (run_dir / "ablations" / "label_fraction.png").read_bytes()[:4] == b"\x89PNG"
    assert table["figure"] == str(run_dir / "ablations" / "label_fraction.png")


@pytest.mark.slow
def test_the_evaluation_notebook_shows_the_table_over_seeds(seeded, tmp_path):
    import nbformat
    import papermill

    from test_notebooks import REPO

    config, run_dir = seeded
    out = tmp_path / "04_evaluation.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks" / "04_evaluation.ipynb"), str(out), cwd=str(REPO),
                               kernel_name="python3", progress_bar=False,
                               parameters={"config": str(config), "seeds": "0,1", "ablations": ["label_fraction"],
                                           "overrides": ["ablations.label_fractions=[0.5, 0.25]"]})
    cells = [c for c in nbformat.read(out, as_version=4).cells if c.cell_type == "code"]
    shown = [o for c in cells for o in c.outputs]
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in shown)
    assert "AP per seed" in markdown and "(mean over seeds 0, 1)" in markdown
    study = next(c for c in cells if "run_ablation(" in c.source and "for study" in c.source)
    kinds = [kind for o in study.outputs for kind in o.get("data", {})]
    assert "text/markdown" in kinds and "image/png" in kinds  # the study's table over the seeds, and its figure
    assert "| 50 % labeled |" in markdown and "mean ± std over seeds 0, 1" in markdown
    assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in shown)  # browse drew


def test_a_seed_run_in_a_process_of_its_own_waits_for_the_shared_teacher(tmp_path):
    """Seeds run as separate processes (one per core or GPU) share one teacher folder: while another
    process holds it (training the teacher), a seed's run must wait for it (and then reuse what it
    made, as a later run does) rather than train the teacher stages beside it."""
    from cast.config import load_config
    from cast.pipeline.seeds import seed_config
    from cast.pipeline.teachers import pretrain_teacher
    from test_folder_lock import hold_in_child

    cfg = seed_config(load_config(write_config(tmp_path)), 1, 0)
    pretrain_teacher(cfg)  # cached: what is left before 1a takes this process well under the hold
    holder = hold_in_child(Path(cfg.shared_dir), 8)
    runner.Pipeline(cfg).run(stop_after="teacher_adaptation")
    released = float(holder.stdout.readline())
    holder.wait()
    written = [p.stat().st_mtime for p in (tmp_path / "runs" / "tiny" / "stages" / "teacher_adaptation").rglob("*")]
    assert written and min(written) >= released


def test_seed_lists_and_aggregation():
    assert parse_seeds("0,1, 2") == [0, 1, 2]
    for bad in ("", "1,1", "-1", "a"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    one = {"model": "m", "params_m": 1.0}
    rows = aggregate_rows({0: [{**one, "AP": 10.0, "AP50": 20.0, "pxl_false_negative_rate": 0.0044}],
                           1: [{**one, "AP": 14.0, "AP50": 30.0, "pxl_false_negative_rate": 0.0064}]}, "model")
    assert rows == [{"model": "m", "params_m": 1.0, "AP": 12.0, "AP_std": 2.828, "AP_seeds": {"0": 10.0, "1": 14.0},
                     "AP50": 25.0, "AP50_std": 7.071, "AP50_seeds": {"0": 20.0, "1": 30.0},
                     "pxl_false_negative_rate": 0.0054}]  # the diagnostics keep their own precision
    # Rounded once: the deviation of 10.0 and 12.76 is 1.9516, which reads 1.9 if stored as 1.95.
    close = aggregate_rows({0: [{**one, "AP": 10.0}], 1: [{**one, "AP": 12.76}]}, "model")[0]
    assert spread(close, "AP") == "11.4 ± 2.0"
    assert STAGES[:2] == ("teacher_adaptation", "teacher_self_training")


def test_an_ablation_table_names_only_the_seeds_it_averages():
    """Two studies on one seed folder at once: the second's seed fails on the folder's lock, and its
    table must say the means are over the other seeds and which one failed."""
    from cast.config import CastConfig
    from cast.pipeline.ablations import render_markdown

    rows = [{"variant": "uniform", "AP": 20.0, "AP_std": 0.0, "AP50": 36.0, "AP50_std": 0.0, "paper_AP": 29.4,
             "paper_AP50": 50.2, "source": "trained"}]
    failed = {1: "FolderInUseError: run folder runs/x/seed_1 is in use"}
    md = render_markdown("samplers", rows, CastConfig(), seeds_summary([0, 1, 2], failed, "runs/x"))
    assert "mean ± std over seeds 0, 2." in md and "seeds 0, 1, 2" not in md
    assert "- Seed 1 failed: FolderInUseError: run folder runs/x/seed_1 is in use" in md
    assert "over seeds" not in render_markdown("samplers", rows, CastConfig(), {})
