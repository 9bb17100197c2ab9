"""A tiny end-to-end CAST run through the command line (tiny presets, tiny demo data, a couple
of steps per stage): every stage, pseudo-labels, predictions and the report; a second run
reuses everything; an ablation table; and clear errors for bad configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cast.cli import main
from cast.config import ABLATION_STUDIES, CastConfig, load_config
from cast.pipeline.ablations import STUDIES, TITLES, run_ablation
from cast.pipeline.report import render_markdown
from cast.pipeline.runner import Pipeline, run
from cast.pipeline.teachers import pretrain_teacher, standin_dir
from cast.runs import STAGES, RunFolder
from cast.training.metrics import diagnostics_summary
from cast.utils.machine import KERNEL_ISA_VARIABLES, describe_machine, machine_info

ROWS = {"teacher_zero_shot", "teacher_adaptation", "teacher_self_training", "student_supervised",
        "knowledge_transfer", "student_refinement"}


def tiny_config(root: Path) -> dict:
    def fast() -> dict:
        return {"steps": 2, "checkpoint_every": 1}

    return {
        "name": "tiny", "output_dir": str(root / "runs"), "seed": 0, "device": "cpu",
        "data": {"kind": "demo", "root": str(root / "data" / "demo"), "labeled_fraction": 0.25,
                 "crop_size": [64, 64], "test_size": 64, "batch_size": 2, "unlabeled_batch_size": 2,
                 "eval_batch_size": 4,
                 "demo": {"image_size": 64, "num_source_train": 6, "num_target_train": 8, "num_target_val": 3,
                          "max_objects": 3}},
        "teacher": {"kind": "standin", "preset": "cast-tiny",
                    "pretrain": {"cache_dir": str(root / "data" / "cache"), "train": fast()}},
        "student": {"preset": "cast-tiny"},
        "training": {"teacher_adaptation": fast(), "teacher_self_training": fast(), "knowledge_transfer": fast(),
                     "student_refinement": {"steps": 1}, "student_supervised": {"steps": 3}},
        "losses": {"num_negatives": 8, "embedding_stride": 8},
        "pseudo_labels": {"score_threshold": 0.0, "min_area": 0, "max_instances": 5},
        "ablations": {"samplers": ["uniform", "fusion"]},
    }


def write_config(root: Path) -> Path:
    """root/tiny.yaml: the tiny run's config in `root`."""
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config(root)))
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cast")
    config = write_config(root)
    assert main(["run", "--config", str(config)]) == 0
    return config, RunFolder(root / "runs" / "tiny")


@pytest.mark.slow
def test_run_writes_every_stage_and_the_report(tiny_run):
    _, folder = tiny_run
    report = json.loads(folder.report_json.read_text())
    assert {r["model"] for r in report["rows"]} == ROWS
    for row in report["rows"]:
        assert set(row) >= {"name", "AP", "AP50", "params_m", "gflops", "latency_ms"}
        assert 0.0 <= row["AP"] <= 100.0 and 0.0 <= row["AP50"] <= 100.0
        assert row["params_m"] > 0 and row["gflops"] > 0 and row["latency_ms"] > 0
    assert report["config"]["name"] == "tiny" and report["split"] == {"labeled": 2, "unlabeled": 6, "val": 3}
    md = folder.report_md.read_text()
    assert "CAST student after refinement (3)" in md and "33.9 / 58.7" in md  # paper numbers beside ours
    walls = {r["model"]: r["wall_s"] for r in report["rows"]}
    stages = sum(w for model, w in walls.items() if model != "teacher_zero_shot")
    assert (f"- Training wall time: stages 1a-3 and the baseline {stages:.0f} s; teacher pretraining "
            f"{walls['teacher_zero_shot']:.0f} s (once, then cached).") in md
    # every wall says what it was measured on (the CPU's instruction set included)
    assert report["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(report["stage_machines"]) == {"teacher_pretrain", *STAGES}
    here = describe_machine(report["machine"])
    assert set(report["stage_machines"].values()) == {here}
    assert f"- Stage walls measured on {here}." in md and f"s on {here} (complete stages" in md
    for stage in STAGES:
        assert json.loads((folder.stage(stage) / "summary.json").read_text())["machine"]["cpu_model"]

    assert folder.config.is_file() and json.loads(folder.split.read_text())["labeled_image_ids"]
    assert folder.available_models() == list(STAGES)
    for stage in STAGES:
        lines = folder.metrics(stage).read_text().splitlines()
        assert json.loads(lines[-1])["step"] == {"student_refinement": 1, "student_supervised": 3}.get(stage, 2)
        assert (folder.stage(stage) / "plots" / "loss.png").is_file()
        assert (folder.checkpoints(stage) / "latest.json").is_file()
    # stages with L_pxl log it; stage 3 and the baseline do not
    assert "loss_pxl_unlabeled" in folder.metrics("knowledge_transfer").read_text()
    assert "loss_pxl" not in folder.metrics("student_refinement").read_text()
    assert folder.available_pseudo_labels() == ["teacher_adaptation", "teacher_self_training"]
    labels = json.loads(folder.pseudo_labels("teacher_self_training").read_text())
    manifest = json.loads(folder.pseudo_label_manifest("teacher_self_training").read_text())
    assert manifest["settings"]["image_ids"] == json.loads(folder.split.read_text())["unlabeled_image_ids"]
    assert manifest["num_instances"] == len(labels) and all("counts" in r["segmentation"] for r in labels)
    assert set(folder.available_predictions()) == ROWS
    assert (folder.plots / "ap.png").is_file()


def test_report_names_each_machine_its_stage_walls_were_measured_on(tmp_path):
    fast = {**machine_info(), "cpu_capability": "AVX512"}
    slow = {**fast, "cpu_capability": "AVX2"}
    rows = [{"name": "a", "model": "teacher_adaptation", "AP": 1.0, "AP50": 2.0, "params_m": 1.0, "gflops": 1.0,
             "latency_ms": 1.0, "wall_s": 10.0}]
    report = {"rows": rows, "config": tiny_config(tmp_path),
              "stage_machines": {"teacher_adaptation": describe_machine(fast), "knowledge_transfer":
                                 describe_machine(slow), "student_refinement": describe_machine(slow)},
              "total_wall_s": 3.0, "machine": slow}
    md = render_markdown(report)
    assert "CPUs (AVX512)" in describe_machine(fast) and "CPUs (AVX2)" in describe_machine(slow)
    assert describe_machine({**fast, "torch_threads": 1}).endswith("(AVX512), 1 torch thread, torch " + fast["torch"])
    assert "), 2 torch threads, torch" in describe_machine({**fast, "torch_threads": 2})
    assert (f"- Stage walls measured on: {describe_machine(fast)} (teacher_adaptation); "
            f"{describe_machine(slow)} (knowledge_transfer, student_refinement).") in md
    assert f"- This invocation: 3 s on {describe_machine(slow)} (complete stages are loaded" in md


def test_a_forced_kernel_instruction_set_is_recorded(monkeypatch):
    # AVX2 kernels forced on an AVX512 CPU train an AVX2 host's weights: the record must say so
    for name in KERNEL_ISA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert "kernel_isa_forced" not in machine_info() and "forced" not in describe_machine(machine_info())
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    info = machine_info()
    assert info["kernel_isa_forced"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert f"CPUs ({info['cpu_capability']}; forced: ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)" \
        in describe_machine(info)


@pytest.mark.slow
def test_second_run_reuses_every_output(tiny_run):
    config, folder = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in folder.root.rglob("*") if p.is_file()
              and ("model" in p.parts or "pseudo_labels" in p.parts or "predictions" in p.parts)}
    before = json.loads(folder.report_json.read_text())["rows"]
    assert main(["run", "--config", str(config)]) == 0
    report = json.loads(folder.report_json.read_text())
    assert [(r["model"], r["AP"]) for r in report["rows"]] == [(r["model"], r["AP"]) for r in before]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing was retrained or recomputed
    assert not any(k in report["timings_s"] for k in STAGES)  # no stage trained this time
    # the training walls are the stages' own, not this invocation's
    assert [r["wall_s"] for r in report["rows"]] == [r["wall_s"] for r in before]
    assert "(complete stages are loaded, not retrained)" in folder.report_md.read_text()


@pytest.mark.slow
def test_sampler_ablation_table(tiny_run):
    config, folder = tiny_run
    assert main(["ablate", "--config", str(config), "--study", "samplers"]) == 0
    table = json.loads((folder.ablations / "samplers.json").read_text())
    assert [r["variant"] for r in table["rows"]] == ["uniform", "fusion"]
    assert table["rows"][0]["source"] == "trained" and table["rows"][1]["source"] == "main run"
    assert table["rows"][1]["paper_AP"] == 32.2
    assert (folder.ablations / "samplers" / "stages" / "uniform" / "model" / "config.json").is_file()
    md = (folder.ablations / "samplers.md").read_text()
    assert "| uniform |" in md and "| empirical margin | false-negative rate |" in md
    # each sampler's diagnostics: the variant's own training, and the main run's for its sampler
    uniform = diagnostics_summary(folder.ablations / "samplers" / "stages" / "uniform" / "metrics.jsonl")
    assert table["rows"][0]["pxl_margin"] == round(uniform["pxl_margin"], 4)
    main_row = next(r for r in json.loads(folder.report_json.read_text())["rows"] if r["model"] == "knowledge_transfer")
    assert table["rows"][1]["pxl_false_negative_rate"] == main_row["pxl_false_negative_rate"]
    assert (folder.ablations / "samplers.png").read_bytes()[:4] == b"\x89PNG"  # margin and FNR per sampler
    model = folder.ablations / "samplers" / "stages" / "uniform" / "model" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    assert main(["ablate", "--config", str(config), "--study", "samplers"]) == 0
    assert model.stat().st_mtime_ns == stamp  # the finished variant is reused under the same settings




@pytest.mark.slow
def test_loss_and_stage_ablations_train_each_variant_and_read_the_rest_from_the_main_run(tiny_run):
    config, folder = tiny_run
    main_rows = {r["model"]: r for r in json.loads(folder.report_json.read_text())["rows"]}
    expected = {"losses": {"L_sup": "trained", "L_sup + L_semi": "trained", "L_sup + L_pxl": "trained",
                           "all (CAST)": "knowledge_transfer"},
                "stages": {"full (1a, 1b, 2, 3)": "student_refinement", "no refinement (3)": "knowledge_transfer",
                           "no teacher adaptation (1a, 1b)": "trained", "distillation only": "trained"}}
    for study, variants in expected.items():
        assert main(["ablate", "--config", str(config), "--study", study]) == 0
        rows = json.loads((folder.ablations / f"{study}.json").read_text())["rows"]
        assert [r["variant"] for r in rows] == list(variants)
        for row in rows:
            source = variants[row["variant"]]
            if source == "trained":
                assert row["source"] == "trained"
            else:  # the variant the main run already is, with its numbers
                assert row["source"] == "main run" and row["AP"] == round(main_rows[source]["AP"], 2)
    trained = folder.ablations / "stages" / "stages"
    assert {p.name for p in trained.iterdir()} == {"no_adaptation_transfer", "no_adaptation_refinement",
                                                   "distillation_only"}
    assert {p.name for p in (folder.ablations / "losses" / "stages").iterdir()} == {
        "l_sup", "l_sup_l_semi", "l_sup_l_pxl"}


@pytest.mark.slow
def test_pxl_weight_sweep_trains_each_weight_and_reports_its_margin(tiny_run):
    config, folder = tiny_run
    own = load_config(config).losses.lambda_pxl
    assert main(["ablate", "--config", str(config), "--study", "pxl_weight",
                 "--set", f"ablations.pxl_weights=[0.0, {own}, 0.5]"]) == 0
    rows = json.loads((folder.ablations / "pxl_weight.json").read_text())["rows"]
    assert [(r["variant"], r["source"]) for r in rows] == [
        ("lambda_pxl = 0", "trained"), (f"lambda_pxl = {own:g}", "main run"), ("lambda_pxl = 0.5", "trained")]
    stages = folder.ablations / "pxl_weight" / "stages"
    for weight, slug in ((0.0, "lambda_pxl_0"), (0.5, "lambda_pxl_0_5")):
        settings = json.loads((stages / slug / "summary.json").read_text())["settings"]
        assert settings["stage"] == "knowledge_transfer"
        assert settings["objective"] == {"lambda_semi": 1.0, "lambda_pxl": weight}
    assert "pxl_margin" not in rows[0]  # trained without L_pxl: no diagnostics
    assert rows[2]["pxl_margin"] == round(diagnostics_summary(stages / "lambda_pxl_0_5" / "metrics.jsonl")["pxl_margin"], 4)
    md = (folder.ablations / "pxl_weight.md").read_text()
    assert "| lambda_pxl = 0 | " in md and "| - | - | trained |" in md  # no margin without L_pxl
    assert (folder.ablations / "pxl_weight.png").read_bytes()[:4] == b"\x89PNG"


def test_every_ablation_study_the_command_line_offers_exists():
    assert tuple(STUDIES) == ABLATION_STUDIES and set(TITLES) == set(STUDIES)


@pytest.mark.slow
def test_label_fraction_ablation_runs_a_whole_pipeline_per_fraction(tiny_run):
    from cast.pipeline.ablations import fraction_reports

    config, folder = tiny_run
    assert main(["ablate", "--config", str(config), "--study", "label_fraction",
                 "--set", "ablations.label_fractions=[0.5, 0.25]"]) == 0
    rows = json.loads((folder.ablations / "label_fraction.json").read_text())["rows"]
    assert [(r["variant"], r["source"]) for r in rows] == [("50 % labeled", "sub-run fraction_0.5"),
                                                          ("25 % labeled", "main run")]
    sub = RunFolder(folder.ablations / "label_fraction" / "fraction_0.5")
    assert set(sub.available_models()) == set(STAGES)  # its own teacher stages too: they read the labels
    labeled = [len(json.loads(f.split.read_text())["labeled_image_ids"]) for f in (sub, folder)]
    assert labeled == [4, 2]  # half, then a quarter, of the 8 target images
    sub_rows = json.loads(sub.report_json.read_text())["rows"]
    assert rows[0]["AP"] == round(next(r for r in sub_rows if r["model"] == "student_refinement")["AP"], 2)
    # the figure reads every model of each fraction's run
    cfg = load_config(config, ["ablations.label_fractions=[0.5, 0.25]"])
    assert fraction_reports(cfg) == {0.5: sub_rows, 0.25: json.loads(folder.report_json.read_text())["rows"]}
    assert (folder.ablations / "label_fraction.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_stage_finished_under_other_settings_is_refused_not_reused(tiny_run, capsys):
    config, folder = tiny_run
    stamps = {p: p.stat().st_mtime_ns for p in folder.root.rglob("*") if p.is_file() and "stages" in p.parts}
    assert main(["run", "--config", str(config), "--set", "training.student_refinement.lr=0.01"]) == 1
    err = capsys.readouterr().err
    assert "student_refinement: finished under other settings (train.lr: 0.0001 -> 0.01)" in err
    assert "run under another name, or delete that folder" in err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no stage touched
    # The first stage the change reaches is the one named.
    assert main(["run", "--config", str(config), "--set", "losses.num_negatives=4"]) == 1
    assert "teacher_adaptation: finished under other settings (losses.num_negatives: 8 -> 4)" in capsys.readouterr().err
    assert main(["run", "--config", str(config)]) == 0  # the run's own settings still reuse everything

def test_bad_config_is_refused_before_any_work(tmp_path, capsys):
    values = tiny_config(tmp_path)
    values["training"]["knowledge_transfer"]["lr"] = -1.0
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'training.knowledge_transfer.lr'" in err and "must be > 0" in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: config file not found" in capsys.readouterr().err


def test_broken_data_names_the_file(tmp_path, capsys):
    values = tiny_config(tmp_path)
    values["data"]["kind"] = "coco"
    values["data"]["root"] = str(tmp_path / "coco")
    (tmp_path / "coco" / "train").mkdir(parents=True)
    (tmp_path / "coco" / "train" / "annotations.json").write_text("{not json")
    config = tmp_path / "coco.yaml"
    config.write_text(yaml.safe_dump(values))
    assert main(["run", "--config", str(config)]) == 1
    assert "annotations.json" in capsys.readouterr().err


def test_unwritable_run_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from cast.pipeline import runner

    def read_only(path, text):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(runner, "atomic_write_text", read_only)
    config = write_config(tmp_path)
    assert main(["run", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"run folder {tmp_path / 'runs' / 'tiny'} is not writable: Read-only file system" in err
    assert not (tmp_path / "data").exists()  # refused before generating data or training


def test_a_run_folder_in_use_by_another_process_is_refused(tmp_path, capsys):
    from test_folder_lock import hold_in_child

    config = write_config(tmp_path)
    child = hold_in_child(tmp_path / "runs" / "tiny", 60)
    try:
        assert main(["run", "--config", str(config)]) == 1
    finally:
        child.kill()
        child.wait()
    assert f"run folder {tmp_path / 'runs' / 'tiny'} is in use by another process (pid {child.pid})" in \
        capsys.readouterr().err
    assert not (tmp_path / "data").exists()  # refused before any work


@pytest.mark.slow
def test_a_frozen_stand_in_encoder_stays_as_pretrained_through_1a_and_1b(tiny_run):
    from safetensors.torch import load_file

    config, folder = tiny_run
    assert main(["run", "--config", str(config), "--name", "frozen", "--set", "teacher.freeze_encoder=true"]) == 0
    frozen = RunFolder(folder.root.parent / "frozen")
    pretrained = load_file(next((folder.root.parents[1] / "data" / "cache").glob("standin-*")) / "model" /
                           "model.safetensors")
    for stage in ("teacher_adaptation", "teacher_self_training"):
        adapted = load_file(frozen.model(stage) / "model.safetensors")
        encoder = [k for k in adapted if k.startswith("encoder.")]
        assert encoder and all(torch.equal(adapted[k], pretrained[k]) for k in encoder), stage
        assert any(not torch.equal(adapted[k], pretrained[k]) for k in adapted if k.startswith("decoder."))
        assert json.loads((frozen.stage(stage) / "summary.json").read_text())["settings"]["frozen_parameters"]


def test_the_stand_in_follows_its_source_data_not_the_folder_it_sits_in(tiny_run, tmp_path):
    """A copied data folder keeps its pretrained stand-in; other source annotations get their own."""
    import shutil

    config, folder = tiny_run
    cache = folder.root.parents[1] / "data" / "cache"
    trained = pretrain_teacher(load_config(config))
    stamp = (trained / "model.safetensors").stat().st_mtime_ns
    shutil.copytree(folder.root.parents[1] / "data" / "demo", tmp_path / "moved")
    cfg = load_config(config, overrides=[f"data.root={tmp_path / 'moved'}"])
    assert pretrain_teacher(cfg) == trained and (trained / "model.safetensors").stat().st_mtime_ns == stamp

    annotations = tmp_path / "moved" / "source_train" / "annotations.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"] = coco["annotations"][1:]
    annotations.write_text(json.dumps(coco))
    assert standin_dir(cfg, ["x"]).parent == cache and standin_dir(cfg, ["x"]) != \
        standin_dir(load_config(config), ["x"])


def _on_device(root: Path, device: str) -> CastConfig:
    config = root / "run.yaml"
    config.write_text(yaml.safe_dump({**tiny_config(root), "device": device}))
    return load_config(config)


@pytest.mark.parametrize("entry", ["Pipeline", "run", "run_ablation", "pretrain_teacher"])
def test_the_python_api_trains_on_the_configs_device(tmp_path, monkeypatch, entry):
    """What the notebooks call (no context passed) honours `device`, as the command line does: a GPU
    asked for is used, or its absence said, never replaced by the CPU in silence."""
    cfg = _on_device(tmp_path, "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    calls = {"Pipeline": lambda: Pipeline(cfg), "run": lambda: run(cfg),
             "run_ablation": lambda: run_ablation(cfg, "losses"), "pretrain_teacher": lambda: pretrain_teacher(cfg)}
    with pytest.raises(RuntimeError, match="device='cuda' was asked for but CUDA is not available"):
        calls[entry]()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()  # refused before any work


def test_the_pipeline_picks_the_gpu_when_the_config_says_auto(tmp_path, monkeypatch):
    cfg = _on_device(tmp_path, "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert Pipeline(cfg).ctx.device == torch.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert Pipeline(cfg).ctx.device == torch.device("cpu")
