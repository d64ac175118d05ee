"""The benchmark scripts run (smoke form); their numbers are never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.conftest import ROOT
from tpdiff_lightning.data.synthetic import clip_rng, make_clip
from tpdiff_lightning.data.video_io import write_mp4

pytestmark = pytest.mark.slow


def perturbed_checkpoint(tmp_path, step: int, **module_args):
    """A tiny TPDiffModule moved off its zero init (adaLN, output layer, pooled caption), so that its caption changes
    its output, saved as a Lightning checkpoint at ``step``; returns the module and the checkpoint's path."""
    import lightning

    from tpdiff_lightning.training.module import TPDiffModule

    torch.manual_seed(0)
    model = TPDiffModule(**module_args)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": step,
                "pytorch-lightning_version": lightning.__version__}, path)
    return model, path


BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:  # the bench scripts import their shared helpers as `common`
    sys.path.insert(0, str(BENCH))


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The benches set one torch thread (their default); give the rest of the session its own count back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_json(path) -> dict:
    """Parse a bench JSON strictly: NaN or infinity is not well-formed output."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds {c}"))


def test_inference_latency_quick_writes_json(tmp_path):
    import inference_latency

    out = tmp_path / "latency.json"
    inference_latency.main(["--quick", "--backbones", "dit", "--out", str(out)])
    result = load_json(out)
    (row,) = result["results"]
    assert row["stage_frames"] == [4, 8, 16] and sum(row["steps_per_stage"]) == result["config"]["steps"]
    assert row["flop_predicted_speedup"] > 1.0  # fewer frames early must mean fewer FLOPs
    for clock in ("cpu", "wall"):
        assert len(row["latency_raw_s"][clock]["vanilla"]) == len(row["latency_raw_s"][clock]["tpdiff"]) == 1
    assert result["machine"]["threads"] >= 1 and "loadavg_start" in result["machine"]


def test_spatiotemporal_latency_quick_writes_json_with_the_flop_predictions(tmp_path):
    import spatiotemporal_latency

    out = tmp_path / "st.json"
    spatiotemporal_latency.main(["--quick", "--out", str(out)])
    result = load_json(out)["results"]
    spatial = result["spatiotemporal"]
    assert [(s["frames"], s["size"]) for s in spatial["stages"]] == [(4, [16, 16]), (8, [16, 16]), (16, [32, 32])]
    assert [s["size"] for s in result["temporal"]["stages"]] == [[32, 32]] * 3
    # fewer tokens early in space as well as time: fewer FLOPs than the temporal pyramid, in sampling and training
    assert spatial["sampling_flop_predicted"] > result["temporal"]["sampling_flop_predicted"] > 1.0
    assert spatial["training_flop_predicted"] > result["temporal"]["training_flop_predicted"] > 1.0
    assert result["vanilla"]["sampling_flop_predicted"] == 1.0


def test_inference_latency_skips_a_backbone_that_does_not_import(tmp_path, monkeypatch):
    import inference_latency

    monkeypatch.setitem(inference_latency.DIFFUSERS, "missing",
                        ("tpdiff_lightning.models.no_such_backbone", "X", "tests.helpers.tiny_wan", "save_tiny_wan"))
    out = tmp_path / "latency.json"
    inference_latency.main(["--quick", "--backbones", "missing", "--out", str(out)])
    result = load_json(out)
    assert result["results"] == [] and "no_such_backbone" in result["skipped"]["missing"]


def test_train_throughput_quick_measures_every_stage(tmp_path):
    import train_throughput

    out = tmp_path / "train.json"
    train_throughput.main(["--quick", "--out", str(out)])
    result = load_json(out)
    frames = [s["frames"] for s in result["stages"]]
    saved = [s["saved_activation_bytes"] for s in result["stages"]]
    flops = [s["train_flops"] for s in result["stages"]]
    assert frames == [4, 8, 16]
    assert saved == sorted(saved) and saved[0] < saved[-1]  # a shorter stage really saves fewer activations
    assert flops[0] < flops[1] < flops[2] and result["flop_predicted_speedup"] > 1.0
    assert result["vanilla"]["saved_activation_bytes"] == pytest.approx(saved[-1], rel=0.05)
    checkpointed = [s["saved_activation_bytes_checkpointed"] for s in result["stages"]]
    assert all(c < s for c, s in zip(checkpointed, saved))  # gradient checkpointing keeps less in every stage
    assert result["expected_tpdiff_step_s"] > 0 and result["speedup_samples_per_s"] > 0


def test_fit_throughput_quick_runs_the_real_fit_of_both_variants(tmp_path):
    import fit_throughput

    out = tmp_path / "fit.json"
    fit_throughput.main(["--quick", "--out", str(out), "--data-root", str(tmp_path / "data")])
    result = load_json(out)
    (res,) = result["results"].values()
    assert result["clock"] == "cpu" and result["step_benchmark"]["speedup_samples_per_s"] > 0
    for variant, frames in (("vanilla", [16]), ("tpdiff", [4, 8, 16])):
        agg = res[variant]
        assert agg["num_steps"] == result["config"]["steps"]
        assert [s["frames"] for s in agg["stages"]] == frames  # the quick run draws every stage
        for s in agg["stages"]:
            assert s["clips_per_s_cpu"] > 0 and s["profile"]["inclusive_ms"]["step"] > 0
            assert {"training_step", "backward", "backbone_forward", "text_encoder"} <= set(s["profile"]["inclusive_ms"])
            assert s["profile"]["top_ops"]
    assert res["ratio_clips_per_s_cpu"] > 0 and "ratio_clips_per_s_cpu_over_step_ratio" in res


def test_alignment_overhead_quick_splits_the_time(tmp_path):
    import alignment_overhead

    out = tmp_path / "align.json"
    alignment_overhead.main(["--quick", "--shapes", "default", "--train-result", str(tmp_path / "none"),
                             "--out", str(out)])
    result = load_json(out)
    assert [c["batch"] for c in result["cases"]] == [4, 16]
    for case in result["cases"]:
        assert [s["frames"] for s in case["stages"]] == [4, 8, 16]
        assert [s["elements_per_sample"] for s in case["stages"]] == [3 * f * 32 * 32 for f in (4, 8, 16)]
        assert all(s[k] > 0 for s in case["stages"] for k in ("total_ms", "cost_matrix_ms", "hungarian_ms"))



def test_alignment_overhead_skips_cases_over_the_memory_cap(tmp_path):
    import alignment_overhead

    out = tmp_path / "align.json"
    alignment_overhead.main(["--shapes", "wan", "--batches", "64", "--max-gb", "0.01", "--repeats", "1",
                             "--threads", "0", "--out", str(out)])
    result = load_json(out)
    assert result["cases"] == [] and result["skipped"][0]["batch"] == 64 and "GB" in result["skipped"][0]["why"]


def test_ablations_quick_has_every_table2_row(tmp_path):
    import ablations

    out = tmp_path / "ablations.json"
    ablations.main(["--quick", "--convergence", str(tmp_path / "none"), "--out", str(out),
                   "--plot", str(tmp_path / "bars.png")])
    assert (tmp_path / "bars.png").stat().st_size > 0
    rows = {r["name"]: r for r in load_json(out)["rows"]}
    overlays = {p.stem for p in (ROOT / "configs" / "ablations").glob("*.yaml")}
    assert set(rows) == overlays | {"default"} and set(rows) <= set(ablations.PAPER)
    assert rows["stages5"]["stage_frames"] == [1, 2, 4, 8, 16]
    assert rows["reductions_4-2"]["stage_frames"] == [2, 8, 16] and rows["reductions_2-4"]["stage_frames"] == [2, 4, 16]
    assert rows["partition_1-1-2"]["steps_per_stage"][-1] > rows["partition_1-1-2"]["steps_per_stage"][0]
    # More of the time at full rate costs more FLOPs than the uniform default, less at low rate costs fewer.
    assert rows["partition_1-1-2"]["infer_flop_predicted"] < rows["default"]["infer_flop_predicted"]
    assert rows["partition_2-1-1"]["infer_flop_predicted"] > rows["default"]["infer_flop_predicted"]
    assert rows["no_alignment"]["infer_flop_predicted"] == pytest.approx(rows["default"]["infer_flop_predicted"])
    assert rows["default"]["final_fvd"] == {}  # no convergence runs yet

    # Later convergence runs fill the quality columns without re-timing: each row beside vanilla's same seed.
    def run(name, seed, fvd):
        return {"run": name, "seed": seed, "points": [{"step": 1, "fvd": fvd + 100}, {"step": 2, "fvd": fvd}]}

    convergence = tmp_path / "convergence.json"
    convergence.write_text(json.dumps({"runs": [run("tpdiff-flow", 0, 900.0), run("vanilla-flow", 0, 950.0),
                                                run("tpdiff-flow", 1, 800.0), run("tpdiff-flow-stages4", 1, 700.0),
                                                run("vanilla-flow", 1, 850.0)]}))
    timings = {r["name"]: r["infer_speedup"] for r in load_json(out)["rows"]}
    ablations.main(["--quality-only", "--convergence", str(convergence), "--out", str(out), "--plot", ""])
    refreshed = {r["name"]: r for r in load_json(out)["rows"]}
    assert {k: r["infer_speedup"] for k, r in refreshed.items()} == timings
    assert refreshed["default"]["final_fvd"] == {"0": 900.0, "1": 800.0}
    assert refreshed["default"]["vanilla_final_fvd"] == {"0": 950.0, "1": 850.0}
    assert refreshed["stages4"]["final_fvd"] == {"1": 700.0} and refreshed["stages4"]["vanilla_final_fvd"] == {"1": 850.0}
    assert refreshed["stages5"]["final_fvd"] == {}
    assert ablations.fvd_cell(refreshed["stages4"]) == "700 vs 850 (s1)"


def test_compare_flags_a_regression_and_passes_an_equal_run(tmp_path):
    import compare

    old = {"bench": "inference_latency", "results": [{"backbone": "dit", "speedup": 1.8, "flop_predicted_speedup": 1.7}]}
    slower = {"bench": "inference_latency", "results": [{"backbone": "dit", "speedup": 1.2, "flop_predicted_speedup": 1.7}]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(slower))
    rows = compare.compare(old, slower, 0.15)
    assert [r["metric"] for r in rows if r["regression"]] == ["speed-up[dit]"]
    assert rows[0]["ratio"] == pytest.approx(1.2 / 1.8)
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path / "old.json"),
                           str(tmp_path / "new.json")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and "REGRESSION" in proc.stdout
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "old.json")]) == 0
    with pytest.raises(ValueError, match="'train_throughput'"):
        compare.compare(old, {"bench": "train_throughput"}, 0.15)
    # Runs with other settings are compared, but with a warning naming what differs.
    quick = dict(slower, config={"batch": 1, "quick": True, "out": "x.json"})
    (tmp_path / "old.json").write_text(json.dumps(dict(old, config={"batch": 4, "quick": False, "out": "y.json"})))
    (tmp_path / "quick.json").write_text(json.dumps(quick))
    proc = subprocess.run([sys.executable, str(BENCH / "compare.py"), str(tmp_path / "old.json"),
                           str(tmp_path / "quick.json")], cwd=ROOT, capture_output=True, text=True)
    assert "different settings" in proc.stdout and "batch: 4 -> 1" in proc.stdout and "out:" not in proc.stdout


def test_a_quick_run_never_writes_over_the_measured_results():
    import argparse

    from common import parse_bench_args

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results/x.json")
    parser.add_argument("--plot", default="docs/x.png")
    parser.add_argument("--quick", action="store_true")
    quick = parse_bench_args(parser, ["--quick"])
    assert Path(quick.out) == ROOT / "bench" / "results" / "quick" / "x.json"
    assert Path(quick.plot) == ROOT / "bench" / "results" / "quick" / "x.png"
    assert parse_bench_args(parser, ["--quick", "--out", "mine.json"]).out == "mine.json"  # asked for: kept
    assert parse_bench_args(parser, []).out == "bench/results/x.json"  # a full run writes the results


def test_training_budget_counts_each_stage_and_batch_shape_it_trains(capsys):
    import convergence

    from tpdiff_lightning.training.module import TPDiffModule

    module = TPDiffModule(clip={"num_frames": 8, "resolution": 16}, optimization={"ema_decay": None})
    budget = convergence.TrainingBudget(tflops=2e-3)
    trainer = SimpleNamespace(logger=None, global_step=0, should_stop=False, is_global_zero=True)

    def batch(clips, stage):  # a token-budget batch: the stage drawn for its step travels with it
        return {"video": torch.zeros(clips, 3, 8, 16, 16), "caption": ["a red circle moving left"] * clips,
                "stage": torch.tensor(stage)}

    def train(b):  # the hooks around one training step
        budget.on_train_batch_start(trainer, module, b, 0)
        budget.on_train_batch_end(trainer, module, None, b, 0)

    counted = []
    for clips, stage in ((1, 0), (1, 0), (4, 0), (1, 2)):
        before = budget.flops
        train(batch(clips, stage))
        counted.append(budget.flops - before)
    assert counted[0] == counted[1] > 0  # the same kind of step costs the same
    assert counted[2] == pytest.approx(4 * counted[0], rel=0.05)  # 4x the clips at stage 0: ~4x the FLOPs
    assert counted[3] > 2 * counted[0]  # the full-rate stage costs more than stage 0 per clip
    assert len(budget._per_step) == 3 and not trainer.should_stop
    train(batch(8, 2))
    assert trainer.should_stop  # past 2 GFLOPs
    # The study runs without a progress bar: a line per tenth of the budget, the last at 100%.
    shares = [int(line.rsplit("(", 1)[1].rstrip("%)")) for line in capsys.readouterr().out.splitlines()]
    assert shares == sorted(set(shares)) and shares[-1] == 100 and len(shares) >= 2
    restored = convergence.TrainingBudget(tflops=2e-3, label="run seed 0: ")
    restored.load_state_dict(budget.state_dict())
    assert restored.flops == budget.flops
    restored.on_train_batch_start(trainer, module, batch(1, 0), 0)
    restored.on_train_batch_end(trainer, module, None, batch(1, 0), 0)
    out = capsys.readouterr().out  # a resumed run says where it is at its first step
    assert out.startswith("run seed 0: step 0: ") and out.rstrip().endswith("of 0.002 TFLOPs (100%)")


def test_convergence_runs_are_existing_config_overlays_and_the_motion_study_is_a_pair():
    import convergence

    for name, overlays in convergence.RUNS.items():
        assert all((ROOT / overlay).is_file() for overlay in overlays), name
    assert convergence.RUNS["vanilla-flow-motion"] == ["configs/motion.yaml", "configs/vanilla.yaml"]
    runs = [{"run": name, "seed": 0, "points": [{"fvd": 500.0, "train_flops": 1.0, "train_seconds": 1.0}]}
            for name in ("tpdiff-flow-motion", "vanilla-flow-motion")]
    assert convergence.analyse(runs)["motion"][0]["tpdiff_final_fvd"] == 500.0



def test_convergence_runs_train_in_their_configs_data_folder_unless_told_otherwise():
    import argparse

    import convergence

    args = argparse.Namespace(data_root=None)
    # The motion runs' centred clips never land in (and so never rebuild) the default data folder.
    assert convergence.data_root(args, "vanilla-flow-motion") == "data/synthetic_centred"
    assert convergence.data_root(args, "tpdiff-flow") == "data/synthetic"
    assert convergence.data_root(argparse.Namespace(data_root="/x"), "tpdiff-flow-motion") == "/x"


def test_convergence_analysis_finds_where_tpdiff_reaches_vanillas_final_fvd():
    import convergence

    def run(name, fvds, flops):
        return {"run": name, "seed": 0, "points": [{"fvd": f, "train_flops": c, "train_seconds": c / 10}
                                                   for f, c in zip(fvds, flops)]}

    runs = [run("vanilla-flow", [900, 700, 500], [100, 200, 400]), run("tpdiff-flow", [800, 450, 300], [100, 200, 400])]
    (row,) = convergence.analyse(runs)["flow"]
    assert row["vanilla_final_fvd"] == 500 and row["tpdiff_final_fvd"] == 300
    assert row["reach_train_flops_fraction"] == pytest.approx(200 / 400)
    runs[1] = run("tpdiff-flow", [800, 700, 600], [100, 200, 400])
    assert convergence.analyse(runs)["flow"][0]["reach_train_flops_fraction"] is None
    assert "flow-seed-mean" not in convergence.analyse(runs)  # one seed: nothing to average


def test_convergence_seed_means_average_the_curves_on_one_flop_grid():
    import convergence

    def run(name, seed, fvds, flops):
        return {"run": name, "seed": seed, "points": [{"fvd": f, "train_flops": c, "train_seconds": c}
                                                      for f, c in zip(fvds, flops)]}

    runs = [run("vanilla-flow", 0, [900, 500], [0, 400]), run("vanilla-flow", 1, [1100, 700], [0, 400]),
            run("tpdiff-flow", 0, [700, 300], [0, 400]), run("tpdiff-flow", 1, [900, 300, 100], [0, 200, 400]),
            run("tpdiff-flow", 2, [1, 1], [0, 400])]  # seed 2 has no vanilla run: left out
    mean = convergence.analyse(runs)["flow-seed-mean"]
    assert mean["seeds"] == [0, 1] and mean["flops_grid"][0] == 0 and mean["flops_grid"][-1] == 400
    assert mean["mean_final_fvd"] == {"tpdiff-flow": 200, "vanilla-flow": 600}
    assert mean["final_gap_mean"] == pytest.approx(-400)  # gaps -200 and -600
    assert mean["final_gap_sem"] == pytest.approx(200)  # their standard deviation 283 over sqrt(2)
    # TPDiff's seed mean is ((700 - x) + (900 - 3x)) / 2 = 800 - 2x up to x = 200: it reaches vanilla's final
    # mean of 600 at x = 100, a quarter of the 400 FLOPs; the grid resolves it to one step (400 / 39).
    for x, v in zip(mean["flops_grid"], mean["mean_fvd"]["tpdiff-flow"]):
        if x <= 200:
            assert v == pytest.approx(800 - 2 * x)
    assert mean["reach_train_flops_fraction"] == pytest.approx(0.25, abs=1 / 39)


def test_convergence_compares_token_budget_batches_with_fixed_ones_by_fvd_and_caption_accuracy():
    import convergence

    def run(name, seed, fvd, direction):
        return {"run": name, "seed": seed, "points": [
            {"fvd": 900.0, "train_flops": 0.0, "train_seconds": 0.0, "colour_accuracy": 0.5, "direction_accuracy": 0.2},
            {"fvd": fvd, "train_flops": 100.0, "train_seconds": 1.0, "colour_accuracy": 0.9,
             "direction_accuracy": direction}]}

    runs = [run("tpdiff-flow-token-budget", 0, 500, 0.5), run("tpdiff-flow-token-budget", 1, 700, 0.3),
            run("tpdiff-flow", 0, 600, 0.25), run("tpdiff-flow", 1, 600, 0.25)]
    mean = convergence.analyse(runs)["flow-token-budget-seed-mean"]
    assert mean["mean_final_fvd"] == {"tpdiff-flow-token-budget": 600, "tpdiff-flow": 600}
    captions = mean["final_caption_accuracy"]
    assert captions["tpdiff-flow-token-budget"]["direction_accuracy"]["mean"] == pytest.approx(0.4)
    assert captions["tpdiff-flow-token-budget"]["direction_accuracy"]["sem"] == pytest.approx(0.1)
    assert captions["tpdiff-flow"]["colour_accuracy"] == {"mean": pytest.approx(0.9), "sem": 0.0}
    assert "flow-token-budget" not in convergence.analyse(runs)  # no per-seed TPDiff/vanilla rows for it


def test_training_budget_needs_exactly_one_positive_budget():
    import convergence

    for kwargs in ({}, {"minutes": 1.0, "tflops": 1.0}, {"minutes": 0.0}, {"tflops": -1.0}):
        with pytest.raises(ValueError, match="expected exactly one positive budget"):
            convergence.TrainingBudget(**kwargs)


def test_convergence_quick_run_writes_fvd_points(tmp_path, tiny_data_root):
    out = tmp_path / "convergence.json"
    subprocess.run([sys.executable, str(BENCH / "convergence.py"), "--quick", "--runs", "vanilla-flow",
                    "--data-root", str(tiny_data_root), "--out-dir", str(tmp_path / "runs"),
                    "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--plot", str(tmp_path / "c.png")],
                   check=True, cwd=ROOT, capture_output=True)
    (run,) = load_json(out)["runs"]
    steps = [p["step"] for p in run["points"]]
    assert run["run"] == "vanilla-flow" and steps == sorted(steps) and steps[-1] == 4
    assert all(p["fvd"] >= 0 and p["train_seconds"] > 0 for p in run["points"])
    assert [p["train_flops"] for p in run["points"]] == sorted(p["train_flops"] for p in run["points"])
    assert (tmp_path / "c.png").stat().st_size > 0


def test_caption_accuracy_is_perfect_on_real_synthetic_clips(tmp_path):
    for i in range(8):
        frames, caption, _ = make_clip(clip_rng(0, "eval", i), 16, 32)
        write_mp4(tmp_path / f"{i:04d}_{caption.replace(' ', '_')}_seed{i}_rank0.mp4", frames)
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "synthetic_caption_accuracy.py"), str(tmp_path)],
                          check=True, cwd=ROOT, capture_output=True, text=True)
    summary = json.loads((tmp_path / "caption_accuracy.json").read_text())["summary"]
    assert summary["clips"] == 8 and summary["colour_accuracy"] == 1.0 and summary["direction_accuracy"] == 1.0, proc.stdout


def test_fvd_cost_quick_runs(tmp_path):
    out = tmp_path / "fvd.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "fvd_cost.py"), "--quick", "--size", "32", "--out", str(out)],
                   check=True, cwd=ROOT, capture_output=True)
    assert json.loads(out.read_text())["i3d"]["clips_per_s"] > 0


def test_gpu_acceptance_dry_run_runs_every_part_and_writes_one_table(tmp_path, capsys):
    """The GPU acceptance command at tiny size on the CPU: every part runs through the same code as on a GPU."""
    import gpu_acceptance

    out = tmp_path / "gpu_acceptance.json"
    result = gpu_acceptance.main(["--dry-run", "--out", str(out)])
    saved = load_json(out)
    assert saved["dry_run"] and saved["parts"] == list(gpu_acceptance.PARTS) and saved["skipped"] == {}
    assert saved["tests"]["returncode"] == 0 and not saved["tests"]["ran"]  # collected only, without CUDA
    assert {"fsdp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"} <= {
        t.split("[")[1].rstrip("]") for t in saved["tests"]["tests"]}
    assert [r["model"] for r in saved["table3"]] == ["Wan2.1-1.3B", "AnimateDiff SD1.5", "Flux-style"]
    for r in saved["table3"]:
        assert r["stage_frames"][-1] == r["latent_shape"][1] and r["stage_frames"][0] < r["stage_frames"][-1]
        assert r["flop_predicted_speedup"] > 1 and r["seconds"]["tpdiff+decode"]["median_s"] > 0
    assert len(saved["train_step"]["dit"]["stages"]) == 3 and saved["train_step"]["wan_lora"]["train_flops"]["vanilla"] > 0
    fit = saved["fit"]
    assert fit["tpdiff"]["points"] > 0 and fit["vanilla"]["points"] > 0 and fit["tpdiff token budget"]["points"] > 0
    assert fit["flop_bound"] > 1 and set(fit["fraction_of_flop_bound"]) == {"fixed", "token budget"}
    assert fit["token_budget"] == fit["batch_size"] * 16 * (16 // 8) ** 2  # batch x full-rate tokens (patch 8)
    assert saved["i3d"]["clips_per_s"] > 0 and len(saved["fvd_overhead"]) == 3
    st = saved["spatiotemporal"]
    assert st["stage_shapes"]["spatiotemporal"][0][1:] == [st["latent_shape"][2] // 4, st["latent_shape"][3] // 4]
    assert st["flop_predicted_speedup"]["spatiotemporal"] > st["flop_predicted_speedup"]["temporal"] > 1
    assert st["flop_predicted_speedup"]["spatiotemporal_221"] > st["flop_predicted_speedup"]["spatiotemporal"]
    assert "steps 2:2:1" in result["table"]
    cp = saved["context_parallel"]
    assert [m["degree"] for m in cp["activation_memory"]] == [1, 2] and len(cp["summary"]) == 2
    assert "CP degree 2, 3 clips" in result["table"] and "ring attention" in result["table"]
    printed = capsys.readouterr().out
    assert result["table"] in printed and "real fit, clips/s" in result["table"]
    assert "real fit, token-budget batches" in result["table"] and "FLOP bound" in result["table"]


def test_gpu_acceptance_keeps_every_other_parts_result_when_one_part_fails(tmp_path, monkeypatch):
    """An OOM, a failing fit or a timeout in one part costs that part only: the others' results are in the JSON,
    which is written after every part."""
    import gpu_acceptance

    written = []
    real_write = gpu_acceptance.write_json
    monkeypatch.setattr(gpu_acceptance, "write_json",
                        lambda path, result, quiet=False: written.append(sorted(result)) or real_write(path, result, quiet))

    def out_of_memory(args):
        import torch

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 169.00 GiB")
    monkeypatch.setattr(gpu_acceptance, "run_i3d", out_of_memory)
    out = tmp_path / "gpu_acceptance.json"
    result = gpu_acceptance.main(["--dry-run", "--parts", "table3,i3d,spatiotemporal", "--models", "flux",
                                  "--out", str(out)])
    saved = load_json(out)
    assert saved["complete"] and "OutOfMemoryError: CUDA out of memory" in saved["errors"]["i3d"]
    assert saved["table3"][0]["model"] == "Flux-style" and saved["table3"][0]["speedup"] > 0  # before the failure
    assert saved["spatiotemporal"]["speedup"]["temporal"] > 0  # after it
    assert "i3d: failed" in result["table"]
    assert len(written) == 4 and "table3" in written[0]  # the JSON after each part, then the final one


def test_gpu_acceptance_keeps_inside_its_budget(tmp_path):
    import gpu_acceptance

    budget = gpu_acceptance.Budget(100.0, reserve=5.0)
    assert budget.timeout(240) <= 100.0 and budget.timeout(10) == 10  # a subprocess never outlives the budget
    out = tmp_path / "gpu_acceptance.json"
    gpu_acceptance.main(["--dry-run", "--parts", "tests,i3d", "--budget-s", "1", "--out", str(out)])
    saved = load_json(out)
    assert set(saved["skipped"]) == {"tests", "i3d"} and "budget" in saved["skipped"]["tests"]


def test_flow_velocity_study_compares_the_two_targets_step_by_step(tmp_path):
    import flow_velocity_study

    def run(name, seed, fvds):
        return {"run": name, "seed": seed, "points": [
            {"step": 150 * (k + 1), "fvd": f, "train_flops": 1e12 * (k + 1)} for k, f in enumerate(fvds)]}

    runs = [run("tpdiff-flow", 0, [900, 800, 700]), run("tpdiff-flow-global", 0, [1000, 850]),
            run("tpdiff-flow", 1, [920, 780, 690]), run("tpdiff-flow-global", 1, [980, 790]),
            run("vanilla-flow", 0, [1200, 1100])]
    (tmp_path / "convergence.json").write_text(json.dumps({"runs": runs}))
    result = flow_velocity_study.main(["--convergence", str(tmp_path / "convergence.json"),
                                       "--out", str(tmp_path / "study.json")])
    assert result["seeds"] == [0, 1] and [r["step"] for r in result["rows"]] == [150, 300]  # steps both reached
    first = result["rows"][0]
    assert first["mean_diff"] == 80 and first["flops_equal"] and first["sem_diff"] == 20


def test_equal_compute_reads_every_curve_at_the_same_flops(tmp_path):
    import equal_compute

    def run(name, seed, flops, fvds):
        return {"run": name, "seed": seed, "points": [{"train_flops": f * 1e12, "fvd": v} for f, v in zip(flops, fvds)]}

    runs = [run("a", 0, [1, 3], [100, 80]), run("a", 1, [1, 3], [120, 100]),
            run("b", 0, [2, 4], [50, 30]), run("b", 1, [2, 4], [70, 50])]
    (tmp_path / "c.json").write_text(json.dumps({"runs": runs}))
    result = equal_compute.main(["--runs", "a,b", "--seeds", "0,1", "--points", "2",
                                 "--convergence", str(tmp_path / "c.json"), "--out", str(tmp_path / "e.json")])
    assert result["train_tflops"] == [2.0, 3.0]  # the span both curves cover
    assert result["mean_fvd"] == {"a": [100.0, 90.0], "b": [60.0, 50.0]}
    assert "mean_direction_accuracy" not in result  # the curves logged no caption accuracy


def test_equal_compute_averages_caption_accuracy_at_the_same_flops_and_plots_each_measure(tmp_path):
    import equal_compute

    def run(name, seed, flops, fvds, directions):
        return {"run": name, "seed": seed, "points": [
            {"train_flops": f * 1e12, "fvd": v, "direction_accuracy": d, "colour_accuracy": 1.0}
            for f, v, d in zip(flops, fvds, directions)]}

    runs = [run("a", 0, [1, 3], [100, 80], [0.25, 0.75]), run("a", 1, [1, 3], [120, 100], [0.0, 0.5]),
            run("b", 0, [2, 4], [50, 30], [0.5, 1.0]), run("b", 1, [2, 4], [70, 50], [0.5, 0.5])]
    (tmp_path / "c.json").write_text(json.dumps({"runs": runs}))
    result = equal_compute.main(["--runs", "a,b", "--seeds", "0,1", "--points", "2", "--plot", str(tmp_path / "p.png"),
                                 "--convergence", str(tmp_path / "c.json"), "--out", str(tmp_path / "e.json")])
    assert result["train_tflops"] == [2.0, 3.0]
    # a at 2 TFLOPs: seed 0 halfway from 25% to 75%, seed 1 from 0% to 50%; b starts at 2 TFLOPs
    assert result["mean_direction_accuracy"] == {"a": pytest.approx([0.375, 0.625]), "b": pytest.approx([0.5, 0.625])}
    assert result["mean_colour_accuracy"] == {"a": pytest.approx([1.0, 1.0]), "b": pytest.approx([1.0, 1.0])}
    assert "a direction" in result["table"] and "38%" in result["table"]
    # first 50% direction: a seed 0 between 1 (25%) and 3 TFLOPs (75%), seed 1 at 3; b seed 0 at its first point
    assert result["direction_reach_tflops"]["a"]["0.5"] == pytest.approx([2.0, 3.0])
    assert result["direction_reach_tflops"]["b"]["0.5"] == pytest.approx([2.0, 2.0])
    assert result["direction_reach_tflops"]["a"]["0.8"] == [None, None]  # never
    from PIL import Image

    assert Image.open(tmp_path / "p.png").size == (3 * 560, 400)  # FVD, colour and direction panels


def test_convergence_extend_refuses_a_finished_run_without_its_checkpoint_before_training_any(tmp_path):
    import convergence

    out = tmp_path / "c.json"
    out.write_text(json.dumps({"runs": [{"run": "vanilla-flow", "seed": 1, "points": []}]}))
    with pytest.raises(SystemExit, match=r"^--extend: no checkpoint to continue vanilla-flow seed 1 \(.*last\.ckpt\)"):
        convergence.main(["--runs", "tpdiff-flow,vanilla-flow", "--seeds", "0,1", "--extend", "--budget-tflops", "2",
                          "--out", str(out), "--out-dir", str(tmp_path / "runs"), "--plot", ""])
    assert not (tmp_path / "runs").exists()  # tpdiff-flow seed 0, listed first, did not start


def test_equal_compute_samples_sheet_has_a_row_per_checkpoint_and_caption(tmp_path):
    import equal_compute_samples
    import lightning
    import torch
    from PIL import Image

    from tpdiff_lightning.data.synthetic import DIRECTIONS, PALETTE, SHAPES, SPEEDS
    from tpdiff_lightning.training.module import TPDiffModule

    every = len(PALETTE) * len(DIRECTIONS) * len(SHAPES) * len(SPEEDS)
    prompts = equal_compute_samples.captions(every)
    assert len({p for p, _, _ in prompts}) == every  # each combination once, shape and speed included
    assert equal_compute_samples.trained_flops({"callbacks": {"TrainingBudget": {"flops": 0.0, "tflops": None}}}) is None
    torch.manual_seed(0)
    model = TPDiffModule(clip={"num_frames": 8, "resolution": 16}, sampling={"steps": 3}, optimization={"ema_decay": None})
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 7,
                "pytorch-lightning_version": lightning.__version__,
                "callbacks": {"TrainingBudget": {"flops": 2.5e12, "tflops": 3.0}}}, path)
    result = equal_compute_samples.main(["--checkpoint", f"a={path}", "--checkpoint", f"b={path}", "--captions", "3",
                                         "--sheet-captions", "2", "--png", str(tmp_path / "s.png"),
                                         "--out", str(tmp_path / "s.json")])
    assert set(result["results"]) == {"a", "b"}
    assert result["results"]["a"]["step"] == 7 and result["results"]["a"]["train_tflops"] == 2.5
    assert result["results"]["a"]["clips"] == result["results"]["b"]["clips"]  # same seeds, same weights
    assert len(result["results"]["a"]["clips"]) == 3
    width, height = Image.open(tmp_path / "s.png").size
    assert (width, height) == (8 * 32, 4 * (32 + 12))  # 2 captions x 2 checkpoints, 8 frames at scale 2
    assert load_json(tmp_path / "s.json")["captions"] == [p for p, _, _ in equal_compute_samples.captions(3)]
    # The check: each caption with seeds 0..N-1, every clip checked against its caption.
    result = equal_compute_samples.main(["--checkpoint", f"a={path}", "--captions", "2", "--seeds-per-caption", "3",
                                         "--sheet-captions", "2", "--png", str(tmp_path / "s.png"),
                                         "--out", str(tmp_path / "s.json")])
    two = [p for p, _, _ in equal_compute_samples.captions(2)]
    assert result["captions"] == [two[0]] * 3 + [two[1]] * 3 and result["seeds"] == [0, 1, 2, 0, 1, 2]
    assert len(result["results"]["a"]["clips"]) == 6


def test_equal_compute_samples_guidance_overrides_the_checkpoints_scale(tmp_path):
    """``--guidance`` samples every checkpoint at the given scale (recorded per checkpoint), which changes the clips of
    a model that reads its caption; without it each checkpoint samples at its own scale."""
    import equal_compute_samples
    import numpy as np
    from PIL import Image


    model, path = perturbed_checkpoint(tmp_path, 1, clip={"num_frames": 8, "resolution": 16},
                                       sampling={"steps": 3, "guidance_scale": 1.0}, optimization={"ema_decay": None})

    def run(*extra: str) -> tuple[dict, np.ndarray]:
        result = equal_compute_samples.main(["--checkpoint", f"a={path}", "--captions", "2", "--sheet-captions", "1",
                                             "--png", str(tmp_path / "s.png"), "--out", str(tmp_path / "s.json"),
                                             *extra])["results"]["a"]
        return result, np.asarray(Image.open(tmp_path / "s.png"))

    (own, own_sheet), (guided, guided_sheet) = run(), run("--guidance", "4")
    assert own["guidance_scale"] == 1.0 and guided["guidance_scale"] == 4.0
    assert not np.array_equal(own_sheet, guided_sheet)  # the guided clips differ
    with pytest.raises(SystemExit):
        run("--guidance", "-1")


def test_caption_overfit_fine_tunes_on_clips_differing_in_one_factor(tmp_path):
    """The overfit check renders one clip per value of the factor (captions differing in that word only), trains the
    checkpoint's weights on them, and measures the factor's gap per stage before and during the fine-tuning."""
    import caption_overfit
    import torch


    video, captions = caption_overfit.clips_varying("direction", 8, 16)
    assert video.shape == (4, 3, 8, 16, 16) and video.min() >= -1 and video.max() <= 1
    assert [c.split()[4] for c in captions] == ["left", "right", "up", "down"]
    assert len({c.replace(c.split()[4], "") for c in captions}) == 1  # nothing else differs
    assert not torch.equal(video[0], video[1])  # left and right move apart
    model, path = perturbed_checkpoint(tmp_path, 3, clip={"num_frames": 8, "resolution": 16},
                                       optimization={"ema_decay": None})
    result = caption_overfit.main([str(path), "--steps", "2", "--every", "1", "--draws", "1", "--lr", "1e-2",
                                   "--out", str(tmp_path / "o.json")])
    assert [p["step"] for p in result["points"]] == [0, 1, 2]
    gaps = [p["gaps"] for p in result["points"]]
    assert all(len(g) == 3 and all(x != 0 for x in g) for g in gaps)  # the swap is real at every stage
    assert gaps[0] != gaps[2]  # the weights were trained
    assert "direction gap, stage 0" in result["table"] and load_json(tmp_path / "o.json")["factor"] == "direction"


def test_step_split_quality_samples_every_split_with_the_same_prompts(tmp_path, tiny_data_root):
    import lightning
    import step_split_quality
    import torch

    from tpdiff_lightning.training.module import TPDiffModule

    torch.manual_seed(0)
    model = TPDiffModule(clip={"num_frames": 16, "resolution": 16}, sampling={"steps": 3}, optimization={"ema_decay": None})
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), "global_step": 0,
                "pytorch-lightning_version": lightning.__version__}, path)
    result = step_split_quality.main(["--checkpoint", str(path), "--videos", "2", "--steps", "6",
                                      "--splits", "1,1,1;2,1,1", "--eval-root", str(tiny_data_root),
                                      "--out", str(tmp_path / "q.json")])
    uniform, early = result["results"]
    assert uniform["steps"] == [2, 2, 2] and early["steps"] == [3, 2, 1]
    assert uniform["flops_relative"] == 1.0 and early["flops_relative"] < 1.0  # steps moved where they are cheap
    assert all(r["fvd"] >= 0 and 0 <= r["colour_ok"] <= 1 for r in result["results"])
    assert load_json(tmp_path / "q.json")["num_videos"] == 2


def test_caption_probe_swaps_each_factor_of_the_caption_at_every_stage(tmp_path, tiny_data_root):
    """The probe's loss with each caption factor swapped, per stage, against the true caption's; a random model
    uses no word, so its gaps are small, and swapping nothing would give exactly 0."""
    import caption_probe
    import torch


    model, path = perturbed_checkpoint(tmp_path, 7, clip={"num_frames": 16, "resolution": 16},
                                       optimization={"ema_decay": None})
    result = caption_probe.main([str(path), "--data-root", str(tiny_data_root), "--clips", "4", "--draws", "1",
                                 "--paths", "--out", str(tmp_path / "p.json")])
    assert [r["stage"] for r in result["stages"]] == [0, 1, 2] and result["step"] == 7
    for row in result["stages"]:
        assert set(row["gap"]) == {"colour swapped", "direction swapped", "shape swapped", "speed swapped",
                                   "no caption"}
        assert all(abs(g) < 0.5 for g in row["gap"].values()) and row["loss"]["true"] > 0
        # Each path swapped alone: a gap of its own, and the pooled path really read the swapped caption (a model
        # whose pooled path saw the true one would give exactly 0 there, as its cross-attention reads the truth).
        assert set(row["paths"]) == set(caption_probe.SWAPS)
        assert all(p["pooled"] != 0 and abs(p["cross_attention"]) < 0.5 for p in row["paths"].values())
    assert "via cross-attention / pooled" in result["table"]
    pool = model.backbone.caption_pool
    with caption_probe.pooled_caption(model.backbone, torch.zeros(1, 2, 128), torch.ones(1, 2, dtype=torch.bool)):
        assert "forward" in vars(pool)
    assert "forward" not in vars(pool)  # the class's forward again
    assert caption_probe.swapped("a red circle moving left fast", caption_probe.SWAPS["direction"]) == \
        "a red circle moving right fast"


def test_context_parallel_quick_compares_both_splits_per_stage_and_measures_memory_per_rank(tmp_path):
    """The stage-aware benchmark on gloo at degrees 2 and 4: both splits timed for every stage, the sequence split's
    traffic counted, and each rank's activation bytes falling with the degree (memory, not timing, is asserted)."""
    import context_parallel

    out = tmp_path / "cp.json"
    context_parallel.main(["--quick", "--out", str(out)])
    result = load_json(out)
    rows = result["stages"]
    assert {(r["degree"], r["batch"]) for r in rows} == {(2, 2), (2, 3), (4, 4), (4, 5)}
    assert len(rows) == 4 * 3 and all(r["sequence_s"] > 0 and r["batch_s"] > 0 for r in rows)
    # the sequence split sends its attention traffic; the batch split only gathers the outputs
    assert all(r["sequence_sent_mb"] > r["batch_sent_mb"] > 0 for r in rows)
    one, two, four = (m["fraction_of_one_process"] for m in result["activation_memory"])
    assert one == 1.0 and four < two < 0.65, result["activation_memory"]
    assert len(result["summary"]) == 4 and all(s["stage_aware_step_s"] > 0 for s in result["summary"])
    # every attention path side by side (dit-nano's 2 heads: Ulysses at degree 2 only); a ring holds one chunk of
    # keys and values at a time, the gathered path all of them
    paths = {(p["degree"], p["path"]): p for p in result["attention_paths"]}
    assert set(paths) == {(2, "ulysses"), (2, "ring"), (2, "gathered"), (4, "ring"), (4, "gathered")}
    assert all(p["step_s"] > 0 and p["sent_mb"] > 0 for p in paths.values())
    assert paths[4, "ring"]["activation_mb"] < paths[4, "gathered"]["activation_mb"]


def test_token_budget_quick_runs_the_real_fit_with_both_batchings(tmp_path):
    """Fixed and stage-aware token-budget batches through the real fit, side by side: both train, the budget run
    logs its tokens, and each run's clip shares by stage are read from its own logs."""
    import token_budget

    out = tmp_path / "tb.json"
    token_budget.main(["--quick", "--out", str(out)])
    rows = {r["batches"]: r for r in load_json(out)["rows"]}
    assert set(rows) == {"fixed", "token budget"}
    assert rows["token budget"]["tokens_per_s"] > 0 and rows["fixed"]["tokens_per_s"] is None
    assert all(r["clips_per_s"] > 0 and abs(sum(r["clip_share_by_stage"]) - 1) < 1e-9 for r in rows.values())


def test_tensorboard_screenshot_names_what_is_missing_in_one_line(tmp_path, monkeypatch, capsys):
    """No browser is installed with the project: the screenshot command says so (and a missing log folder) in one
    line before starting anything."""
    import shutil

    import tensorboard_screenshot

    with pytest.raises(SystemExit):
        tensorboard_screenshot.main([str(tmp_path / "nowhere")])
    assert f"logdir '{tmp_path / 'nowhere'}' is not a folder" in capsys.readouterr().err
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SystemExit):
        tensorboard_screenshot.main([str(tmp_path)])
    assert "no Chromium found" in capsys.readouterr().err


def test_caption_variance_shares_are_what_each_factor_explains(tmp_path):
    """A factor that sets the pixels explains all their variance, one independent of them none (to sampling error);
    on real synthetic clips every share lies in [0, 1] and colour, which paints the whole shape, explains some."""
    import caption_variance
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.integers(0, 2, 400)
    b = rng.integers(0, 2, 400)
    clips = np.stack([np.full((3, 4), float(v)) for v in a])
    shares = caption_variance.explained_shares(clips, {"a": list(a), "b": list(b)})
    assert shares["a"] == pytest.approx(1.0, abs=1e-12) and shares["b"] < 0.02
    result = caption_variance.main(["--clips", "32", "--num-frames", "4", "--size", "16", "--frame-step", "2",
                                    "--out", str(tmp_path / "v.json")])
    assert set(result["shares"]) == set(caption_variance.FACTORS)
    assert all(0 <= s <= 1 for s in result["shares"].values()) and result["shares"]["colour"] > 0.01
    assert load_json(tmp_path / "v.json")["frame_step"] == 2


def test_noisy_end_probe_scores_the_model_against_each_captions_mean_clip(tmp_path):
    """At t = 1 each group's predictor is the stage target with the clip replaced by its group's mean training clip,
    so its loss is gamma_e^2 times the mean squared gap between the eval clips and those means at stage 0's frames,
    whatever the noise; the model's rows read the true and the direction-swapped caption."""
    import noisy_end_probe
    import torch

    from tpdiff_lightning.data.pipelines import eval_pipeline
    from tpdiff_lightning.data.synthetic import read_manifest, write_synthetic_shards

    root = tmp_path / "data"  # its own shards: every training clip read, by the bench and here alike
    write_synthetic_shards(root, num_train=12, num_eval=4, num_frames=16, size=16, progress=False)

    model, path = perturbed_checkpoint(tmp_path, 5, clip={"num_frames": 16, "resolution": 16},
                                       optimization={"ema_decay": None})
    result = noisy_end_probe.main([str(path), "--data-root", str(root), "--train-clips", "100",
                                   "--clips", "4", "--draws", "2", "--out", str(tmp_path / "n.json")])
    loss = {r["predictor"]: r["loss"] for r in result["rows"]}
    assert result["step"] == 5 and result["groups"]["all"] == 1 and result["groups"]["direction"] <= 4
    # The closed form, from the clips decoded here: every training clip's mean, then the eval clips' gap to it.
    manifest = read_manifest(root)
    def decoded(split):
        urls = [str(root / s) for s in manifest["splits"][split]["shards"]]
        return torch.cat([model.batch_latents({"video": b["video"]}) for b in eval_pipeline(urls, 16, 16, 64)])
    stage = model.pyramid.stages[0]
    gamma_e, _ = model.pyramid.schedule.scalar(stage.t_end)
    down = lambda x: model.pyramid.downsample(x, stage.stride)  # noqa: E731
    train, evals = decoded("train").double(), decoded("eval").double()
    expected = gamma_e**2 * float(((down(evals) - down(train.mean(0, keepdim=True))) ** 2).mean())
    assert abs(loss["mean of all training clips"] - expected) < 1e-4 * expected
    assert all(v > 0 for v in loss.values())
    assert loss["model, direction word swapped"] != loss["model, true caption"]  # the swapped words were encoded
    assert "mean by direction" in result["table"]
    assert noisy_end_probe.caption_factors("a red circle moving left fast")["direction"] == "left"
    with pytest.raises(ValueError, match="is not a synthetic one"):
        noisy_end_probe.caption_factors("a cat")


def test_colour_confusion_reads_every_colour_word_and_draws_every_caption(tmp_path, tiny_data_root):
    """The loss with each colour word per (colour, direction) of the eval clips, and the drawn colour per caption
    with and without a stray letter; a wrong word within the margin is a confusion, one outside it is not."""
    import colour_confusion

    _, path = perturbed_checkpoint(tmp_path, 3, clip={"num_frames": 16, "resolution": 16},
                                   optimization={"ema_decay": None})
    result = colour_confusion.main([str(path), "--data-root", str(tiny_data_root), "--draws", "1", "--seeds", "1",
                                    "--steps", "3", "--out", str(tmp_path / "c.json")])
    assert result["loss"] and all(set(row) == set(colour_confusion.COLOURS)
                                  for rows in result["loss"].values() for row in rows.values())
    assert all(loss > 0 for rows in result["loss"].values() for row in rows.values() for loss in row.values())
    assert len(result["drawn"]) == len(result["drawn_with_stray_letter"]) == 16
    assert all(len(drawn) == 1 for drawn in result["drawn"].values())
    assert colour_confusion.recolour("a green circle moving down fast", "red") == "a red circle moving down fast"
    with pytest.raises(SystemExit):  # a folder with no synthetic eval split: one parser error, nothing loaded
        colour_confusion.main([str(path), "--data-root", str(tmp_path), "--out", str(tmp_path / "x.json")])
    table = {"down": {"green": {"red": 1.05, "green": 1.0, "blue": 3.0, "yellow": 1.2}}}
    assert [(c["clip colour"], c["caption colour"]) for c in colour_confusion.confusions(table, 0.1)] == \
        [("green", "red")]
