"""The long study's machinery (tools/compare_optimizers.py --long, pretrain/study): the lr grid
extended outward while the best sits at an edge, the deadline that leaves a study partial and
resumable, optimizers side by side, model sizes with their tokens-per-parameter check, and the
scale section of the report. Runs are stubbed (a parabola in log lr), so this is fast."""
from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _tool():
    spec = importlib.util.spec_from_file_location("compare_optimizers_long", ROOT / "tools/compare_optimizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# optimum lr per optimizer; for "sgd" it sits far above its grid (needs extensions), and its floor
# improves more with size than AdamW's, so the two swap places between sizes s and m.
OPT_LR = {"adamw": 3e-3, "sgd": 40.0}
FLOOR = {("adamw", "gpt_s"): 4.0, ("sgd", "gpt_s"): 4.5, ("adamw", "gpt_m"): 3.8, ("sgd", "gpt_m"): 3.5}


class Stub:
    """Writes result.json like the worker, so finished runs are found again by a later invocation."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec):
        self.calls.append(spec)
        out = Path(spec["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        size = out.parent.name
        loss = FLOOR[(spec["key"], size)] + (math.log10(spec["lr"]) - math.log10(OPT_LR[spec["key"]])) ** 2 \
            + 0.01 * (spec["seed"] - 1)
        steps = spec["steps"]
        curve = [[spec["tokens_per_step"] * s, loss + (1 - s / steps)] for s in (steps // 2, steps)]
        result = dict(spec, failed=False, final_val_loss=loss, final_train_loss=loss, val_curve=curve, train_curve=curve,
                      tokens_per_s=1000.0, peak_memory_bytes=100 * 2 ** 20, optimizer_state_bytes=2 ** 20,
                      param_bytes=2 ** 20, wall_s=1.0, train_wall_s=1.0)
        (out / "result.json").write_text(json.dumps(result))
        return result


def test_extend_grid_steps_outward_from_the_edge_only():
    from pretrain.study.study import extend_grid

    lrs = [1e-3, 3.16e-3, 1e-2, 3.16e-2]
    assert extend_grid(lrs, 3.16e-3) is None  # interior: nothing to add
    assert extend_grid(lrs, 1e-3) == pytest.approx(3.16e-4, rel=1e-3)
    assert extend_grid(lrs, 3.16e-2) == pytest.approx(1e-1, rel=1e-2)


def test_grid_extends_until_the_optimum_is_interior_and_stops_at_the_cap(tmp_path):
    from pretrain.study.catalog import CATALOG
    from pretrain.study.study import StudyPlan, TaskPlan, run_study

    tp = TaskPlan("gpt", str(ROOT / "configs/gpt_tiny.yaml"), 256 * 4, 256 * 4, name="gpt_s",
                  lr_centers={"sgd": 1.0})
    plan = StudyPlan([tp], [CATALOG["sgd"]], lrs_per_optimizer=4, lr_span_decades=1.5, seeds=(1,),
                     work_dir=str(tmp_path / "a"), max_extensions=5)
    out = run_study(plan, Stub(), log=lambda *_: None)["tasks"]["gpt_s"]
    lrs = sorted(r["lr"] for r in out["sweep"])
    best = out["best_lr"]["sgd"]
    assert lrs[0] < best < lrs[-1]  # interior after the extensions
    # 0.178 .. 5.62, then 17.8 and 56.2 (still the edge), then 178: 56.2 is interior
    assert len(lrs) == 7 and best == pytest.approx(56.2, rel=0.01)
    # capped: with one extension the best is still at the (new) edge, and the report will say so
    capped = StudyPlan([tp], [CATALOG["sgd"]], lrs_per_optimizer=4, lr_span_decades=1.5, seeds=(1,),
                       work_dir=str(tmp_path / "b"), max_extensions=1)
    out = run_study(capped, Stub(), log=lambda *_: None)["tasks"]["gpt_s"]
    assert len(out["sweep"]) == 5 and out["best_lr"]["sgd"] == max(r["lr"] for r in out["sweep"])


def test_deadline_leaves_the_study_partial_and_a_rerun_resumes_it(tmp_path):
    from pretrain.study.catalog import CATALOG
    from pretrain.study.study import StudyPlan, TaskPlan, run_study

    tp = TaskPlan("gpt", str(ROOT / "configs/gpt_tiny.yaml"), 1024, 1024, name="gpt_s")
    kw = dict(lrs_per_optimizer=4, lr_span_decades=1.5, seeds=(1, 2), work_dir=str(tmp_path / "runs"))
    stub = Stub()
    full = run_study(StudyPlan([tp], [CATALOG["adamw"]], **kw), stub, log=lambda *_: None)
    assert not full["partial"] and len(stub.calls) == 5  # 4 sweep runs + seed 2
    # Past the deadline nothing new starts, but everything already finished is collected again.
    (Path(stub.calls[-1]["output_dir"]) / "result.json").unlink()  # seed 2's final run "never ran"
    late = Stub()
    again = run_study(StudyPlan([tp], [CATALOG["adamw"]], deadline=time.time() - 1, **kw), late, log=lambda *_: None)
    assert late.calls == [] and again["partial"]
    t = again["tasks"]["gpt_s"]
    assert t["incomplete"] == ["adamw"] and len(t["sweep"]) == 4 and [r["seed"] for r in t["final"]] == [1]


def test_jobs_side_by_side_give_the_same_study(tmp_path):
    from pretrain.study.catalog import CATALOG
    from pretrain.study.study import StudyPlan, TaskPlan, run_study

    tp = TaskPlan("gpt", str(ROOT / "configs/gpt_tiny.yaml"), 1024, 1024, name="gpt_s", lr_centers={"sgd": 1.0})
    outs = []
    for jobs in (1, 2):
        plan = StudyPlan([tp], [CATALOG["adamw"], CATALOG["sgd"]], lrs_per_optimizer=4, lr_span_decades=1.5,
                         seeds=(1, 2), work_dir=str(tmp_path / f"j{jobs}"), max_extensions=3, jobs=jobs)
        outs.append(run_study(plan, Stub(), log=lambda *_: None)["tasks"]["gpt_s"])
    assert outs[0]["best_lr"] == outs[1]["best_lr"]
    assert [(r["key"], r["lr"], r["seed"]) for r in outs[0]["final"]] == [(r["key"], r["lr"], r["seed"]) for r in outs[1]["final"]]


def test_sizes_refuse_a_budget_below_the_tokens_per_parameter_floor(capsys):
    tool = _tool()
    with pytest.raises(SystemExit) as e:
        tool.main(["--long", "--steps", "100", "--sizes", "s", "--tasks", "gpt", "--plan"])
    assert "per parameter" in str(e.value) and "gpt_s" in str(e.value)


def test_long_study_over_two_sizes_reports_the_scale_axis_and_flips(tmp_path):
    tool = _tool()
    out = tmp_path / "report"
    argv = ["--long", "--steps", "8", "--min-tokens-per-param", "0", "--optimizers", "adamw,sgd", "--tasks", "gpt",
            "--sizes", "s,m", "--seeds", "1,2", "--max-extensions", "4", "--out", str(out),
            "--work-dir", str(tmp_path / "runs"), "--jobs", "2", "--lr-center", "sgd=1.0"]
    assert tool.main(argv, run_fn=Stub()) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["study"]["tasks"]) == {"gpt_s", "gpt_m"}
    meta = data["meta"]["tasks"]
    assert meta["gpt_m"]["parameters"] > 2 * meta["gpt_s"]["parameters"] > 0
    # the long study's settings: 4-point grid half a decade apart, warm-up 5% of the steps, 2 seeds here
    spec = data["study"]["tasks"]["gpt_s"]["final"][0]
    assert "schedule.warmup_steps=0" in spec["overrides"]  # round(0.05 * 8)
    assert data["summaries"]["gpt_s"]["ranking"] == ["adamw", "sgd"]
    assert data["summaries"]["gpt_m"]["ranking"] == ["sgd", "adamw"]
    report = (out / "report.md").read_text()
    assert "## GPT across model sizes" in report
    assert "AdamW / SGD (gpt_s -> gpt_m)" in report
    assert (out / "loss_vs_size_gpt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "PARTIAL" not in report


def test_report_only_marks_partial_and_extrapolates_the_unrun_size(tmp_path):
    tool = _tool()
    common = ["--long", "--steps", "8", "--min-tokens-per-param", "0", "--optimizers", "adamw", "--tasks", "gpt",
              "--seeds", "1,2", "--work-dir", str(tmp_path / "runs")]
    assert tool.main([*common, "--sizes", "s", "--out", str(tmp_path / "s")], run_fn=Stub()) == 0
    stub = Stub()
    out = tmp_path / "both"
    assert tool.main([*common, "--sizes", "s,m", "--report-only", "--out", str(out)], run_fn=stub) == 0
    assert stub.calls == []  # nothing trained, size s reused
    data = json.loads((out / "results.json").read_text())
    rows = {r["task"]: r for r in data["meta"]["timing"]["rows"]}
    n = {k: data["meta"]["tasks"][k]["parameters"] for k in ("gpt_s", "gpt_m")}
    assert not rows["gpt_s"]["extrapolated"] and rows["gpt_s"]["remaining_tokens"] == 0
    assert rows["gpt_m"]["extrapolated"]
    assert rows["gpt_m"]["tokens_per_s"] == pytest.approx(1000.0 * n["gpt_s"] / n["gpt_m"])
    assert data["meta"]["timing"]["remaining_runs"] == 5  # 4 sweep runs + 1 more seed at size m
    report = (out / "report.md").read_text()
    assert "PARTIAL" in report and "Remaining: 5 runs" in report


def test_a_run_made_in_another_checkout_is_still_reused(tmp_path):
    from pretrain.study.study import ROOT as root
    from pretrain.study.study import same_spec

    here = dict(kind="train", config=f"{root}/configs/gpt_tiny.yaml", lr=1e-3,
                overrides=[f"data.tokenizer={root}/data/tokenizer/spm_bpe_1k.model", "train.steps=2000"],
                output_dir=str(tmp_path / "runs/gpt_s/x"))
    other = "/elsewhere/clone"
    there = dict(here, config=f"{other}/configs/gpt_tiny.yaml",
                 overrides=[f"data.tokenizer={other}/data/tokenizer/spm_bpe_1k.model", "train.steps=2000"])
    assert same_spec(there, here)
    assert same_spec(dict(there, label="GaLore-AdamW r=96"), dict(here, label="GaLore-AdamW r=hidden/4"))
    assert not same_spec(dict(there, overrides=[there["overrides"][0], "train.steps=1000"]), here)
    assert not same_spec(dict(there, lr=3e-3), here)
    # --work-dir runs/long_study in one sitting, /abs/path/runs/long_study in the next
    relative = dict(here, output_dir="runs/gpt_s/x", overrides=["output_dir=runs/gpt_s/x", *here["overrides"]])
    absolute = dict(here, overrides=[f"output_dir={here['output_dir']}", *here["overrides"]])
    assert same_spec(relative, absolute)
    assert not same_spec(dict(relative, overrides=[*relative["overrides"][:2], "train.steps=1000"]), absolute)


class LoggingStub(Stub):
    """Reuses a finished run with the same spec, as ``study.subprocess_run`` does, and also writes
    the trainer's metrics.jsonl, which the report copies into raw/."""

    def __call__(self, spec):
        from pretrain.study.study import finished_result

        old = finished_result(spec)
        if old is not None:
            return old
        result = super().__call__(spec)
        (Path(spec["output_dir"]) / "metrics.jsonl").write_text(json.dumps({"step": spec["steps"], "lr": spec["lr"]}) + "\n")
        return result


def test_a_fresh_clone_resumes_from_the_committed_report_without_retraining(tmp_path):
    import shutil

    tool = _tool()
    out, runs = tmp_path / "report", tmp_path / "runs"
    common = ["--long", "--steps", "8", "--min-tokens-per-param", "0", "--optimizers", "adamw", "--tasks", "gpt",
              "--sizes", "s", "--seeds", "1,2", "--out", str(out)]
    assert tool.main([*common, "--work-dir", str(runs)], run_fn=LoggingStub()) == 0
    before = json.loads((out / "results.json").read_text())["summaries"]["gpt_s"]["rows"]["adamw"]
    raw_before = sorted(p.relative_to(out) for p in (out / "raw").rglob("metrics.jsonl"))
    assert len(raw_before) == 5
    # a fresh clone: the run directories are gone, only the report directory was committed
    shutil.rmtree(runs)
    fresh = tmp_path / "clone_runs"
    stub = LoggingStub()
    assert tool.main([*common, "--work-dir", str(fresh)], run_fn=stub) == 0
    assert stub.calls == []  # nothing retrained
    data = json.loads((out / "results.json").read_text())
    after = data["summaries"]["gpt_s"]["rows"]["adamw"]
    assert after["val_losses"] == before["val_losses"] and after["best_lr"] == before["best_lr"]
    assert sorted(p.relative_to(out) for p in (out / "raw").rglob("metrics.jsonl")) == raw_before  # raw/ kept
    assert all(r["output_dir"].startswith(str(fresh)) for r in data["study"]["tasks"]["gpt_s"]["sweep"])
    # a plan with other settings (same run names, another warm-up) does not take the stored runs for its own
    other = LoggingStub()
    assert tool.main([*common, "--warmup-fraction", "0.5", "--work-dir", str(tmp_path / "other_runs")],
                     run_fn=other) == 0
    assert len(other.calls) == 5


def test_a_crashed_run_in_the_report_is_not_restored(tmp_path):
    from pretrain.study.restore import restore_runs

    ok = dict(kind="train", name="a", output_dir="/old/runs/gpt_s/a", final_val_loss=3.0)
    crashed = dict(kind="train", name="b", output_dir="/old/runs/gpt_s/b", failed=True, error="worker exited -9",
                   final_val_loss=None)
    diverged = dict(kind="train", name="c", output_dir="/old/runs/gpt_s/c", failed=True, final_val_loss=None)
    (tmp_path / "results.json").write_text(json.dumps(
        {"study": {"tasks": {"gpt_s": {"sweep": [ok, crashed, diverged], "final": [dict(ok, reused_from_sweep=True)]}}}}))
    assert restore_runs(tmp_path, tmp_path / "runs") == 2
    got = json.loads((tmp_path / "runs/gpt_s/a/result.json").read_text())
    assert got["output_dir"] == str(tmp_path / "runs/gpt_s/a") and "reused_from_sweep" not in got
    assert not (tmp_path / "runs/gpt_s/b").exists() and (tmp_path / "runs/gpt_s/c/result.json").is_file()
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(SystemExit, match="not valid JSON"):
        restore_runs(tmp_path, tmp_path / "runs")
