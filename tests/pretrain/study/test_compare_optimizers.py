"""tools/compare_optimizers.py: lr choice, reuse of the sweep run, noise and paper verdicts,
report/plots/JSON (stubbed runs), and one real tiny study end to end (in process)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _tool():
    spec = importlib.util.spec_from_file_location("compare_optimizers", ROOT / "tools/compare_optimizers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_lr_grid_is_log_spaced_around_the_centre():
    from pretrain.study.catalog import CATALOG, is_log_spaced, lr_grid

    assert lr_grid(1e-3, 3) == [0.000316, 0.001, 0.00316]
    g = lr_grid(1e-2, 5, span_decades=2.0)
    assert len(g) == 5 and is_log_spaced(g) and math.isclose(g[0], 1e-3) and math.isclose(g[-1], 1e-1)
    assert lr_grid(3e-3, 1) == [3e-3]
    assert not is_log_spaced([1e-3, 2e-3, 1e-2])
    assert {"sgd", "adamw", "adafactor", "came", "lomo", "adalomo", "adapprox_k8", "adapprox_k16", "galore"} <= set(CATALOG)


def test_best_lr_is_the_lowest_final_validation_loss_and_never_a_failed_run():
    from pretrain.study.study import best_lr

    sweep = [dict(lr=1e-3, final_val_loss=5.0), dict(lr=3e-3, final_val_loss=4.2),
             dict(lr=1e-2, final_val_loss=None, failed=True), dict(lr=3e-2, final_val_loss=float("nan"))]
    assert best_lr(sweep) == 3e-3
    assert best_lr([dict(lr=2e-3, final_val_loss=4.0), dict(lr=1e-3, final_val_loss=4.0)]) == 1e-3  # tie: smaller
    with pytest.raises(RuntimeError):
        best_lr([dict(lr=1.0, final_val_loss=None, failed=True)])


# A deterministic stand-in for training: the loss is a parabola in log10(lr) whose minimum and
# floor depend on the optimizer, plus a per-seed offset; the largest lr of "adamw" diverges.
FLOOR = {"adamw": 4.0, "sgd": 7.0, "adafactor": 4.3}
OPT_LR = {"adamw": 1e-3, "sgd": 1.0, "adafactor": 1e-2}


def _stub_loss(key, lr, seed):
    return FLOOR[key] + (math.log10(lr) - math.log10(OPT_LR[key] * 2.5)) ** 2 + 0.01 * (seed - 1234)


class Stub:
    def __init__(self):
        self.calls = []

    def __call__(self, spec):
        self.calls.append(spec)
        out = Path(spec["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        if spec["kind"] == "eval":
            return dict(spec, zeroshot={"heldout_cloze": {"acc": 0.1, "perplexity": 900.0}}, zeroshot_wall_s=1.0)
        key, lr, seed = spec["key"], spec["lr"], spec["seed"]
        if key == "adamw" and lr > 2e-3:
            return dict(spec, failed=True, error="stopping: 5 non-finite losses", final_val_loss=None, wall_s=1.0)
        final = _stub_loss(key, lr, seed)
        steps = spec["steps"]
        val = [[spec["tokens_per_step"] * s, final + 2.0 * (1 - s / steps)] for s in (steps // 2, steps)]
        (out / "metrics.jsonl").write_text("".join(json.dumps(dict(step=s, loss=v, tokens=t)) + "\n"
                                                    for s, (t, v) in enumerate(val, 1)))
        return dict(spec, failed=False, final_val_loss=final, final_train_loss=final - 0.05, val_curve=val,
                    train_curve=val, tokens_per_s=1000.0 if key != "sgd" else 1500.0,
                    peak_memory_bytes=(500 + 10 * len(key)) * 2 ** 20, optimizer_state_bytes={"adamw": 8, "sgd": 0, "adafactor": 1}[key] * 2 ** 20,
                    param_bytes=4 * 2 ** 20, wall_s=2.0, train_wall_s=1.5,
                    zeroshot={"heldout_cloze": {"acc": 0.2, "perplexity": 800.0}} if spec["run_zeroshot"] else None)


def test_study_with_stubbed_runs_writes_report_plots_and_json(tmp_path):
    tool = _tool()
    stub = Stub()
    out = tmp_path / "report"
    argv = ["--optimizers", "adamw,sgd,adafactor", "--tasks", "gpt", "--gpt-config", str(ROOT / "configs/gpt_tiny.yaml"),
            "--budget-tokens", "2048", "--lrs-per-optimizer", "3", "--seeds", "1234,1235", "--out", str(out),
            "--work-dir", str(tmp_path / "runs"), "--label", "STUB"]
    assert tool.main(argv, run_fn=stub) == 0
    data = json.loads((out / "results.json").read_text())
    gpt = data["study"]["tasks"]["gpt"]
    # the chosen lr is the one whose sweep run has the lowest final validation loss (diverged runs excluded)
    for key in ("adamw", "sgd", "adafactor"):
        sweep = [r for r in gpt["sweep"] if r["key"] == key]
        assert len(sweep) == 3
        finite = [r for r in sweep if r["final_val_loss"] is not None]
        assert gpt["best_lr"][key] == min(finite, key=lambda r: r["final_val_loss"])["lr"]
    assert gpt["best_lr"]["adamw"] == pytest.approx(1e-3)  # 3.16e-3 would be nearer the optimum but diverged
    assert gpt["best_lr"]["sgd"] == pytest.approx(3.16)
    # sweep budget == final budget: seed 1234's final run is the sweep run (not retrained), zero-shot added
    trains = [c for c in stub.calls if c["kind"] == "train"]
    assert len(trains) == 3 * 3 + 3 * 1
    assert sorted({c["seed"] for c in trains if c["phase"] == "final"}) == [1235]
    finals = [r for r in gpt["final"] if r["key"] == "sgd"]
    assert sorted(r["seed"] for r in finals) == [1234, 1235]
    assert all(r["zeroshot"] for r in finals)
    # every run of a seed starts from the same seed (identical init and data order across optimizers)
    assert {c["seed"] for c in trains if c["phase"] == "sweep"} == {1234}
    summ = data["summaries"]["gpt"]
    assert summ["ranking"] == ["adamw", "adafactor", "sgd"]
    assert summ["rows"]["adamw"]["half_range"] == pytest.approx(0.005)
    for png in ("loss_vs_tokens_gpt.png", "memory_vs_loss_gpt.png", "lr_sweep_gpt.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "STUB" in report and "| 1 | AdamW | 0.001 | 4." in report
    assert "not results" not in report  # only a label starting with "SMOKE" says that
    assert "beyond noise" in report and "Ranking compared with the reported results" in report
    assert "(edge of grid)" in report  # sgd's best is the largest lr tried
    assert "diverged" in report
    assert (out / "raw/gpt").is_dir() and any((out / "raw/gpt").rglob("metrics.jsonl"))
    assert "predicted" in report  # the budget arithmetic


def test_a_finished_run_is_reused_not_retrained(tmp_path):
    from pretrain.study.catalog import CATALOG
    from pretrain.study.study import StudyPlan, TaskPlan, subprocess_run, train_spec

    tp = TaskPlan("gpt", str(tmp_path / "missing.yaml"), 1024, 1024)  # a real run would fail at once
    plan = StudyPlan([tp], [CATALOG["adamw"]], work_dir=str(tmp_path / "runs"))
    from unittest import mock

    with mock.patch("pretrain.study.study.tokens_per_step", return_value=(4, 64, 256)):
        spec = train_spec(plan, tp, CATALOG["adamw"], 1e-3, 1234, "sweep", 1024, False, True)
    out = Path(spec["output_dir"])
    out.mkdir(parents=True)
    # the worker's result holds the spec plus what it measured (its zero-shot summary included)
    (out / "result.json").write_text(json.dumps(dict(spec, final_val_loss=3.5, failed=False, zeroshot={"t": {"acc": 1.0}})))
    r = subprocess_run(spec)
    assert r["final_val_loss"] == 3.5 and not r["failed"] and r["reused"]  # the report counts reused runs
    changed = dict(spec, lr=2e-3)  # another spec in the same directory is run again (and fails here: no config)
    assert subprocess_run(changed)["failed"]


def test_noise_and_paper_verdicts():
    from pretrain.study.report import compare_with_paper, summarize_task

    def run(key, seed, v):
        return dict(key=key, label=key, seed=seed, lr=1e-3, final_val_loss=v, name=f"{key}{seed}", output_dir="x")

    # adamw (paper 3.99) vs came (paper 3.86) vs sgd (7.12): here came < adamw within noise, sgd last beyond noise
    finals = [run("came", 1, 4.00), run("came", 2, 4.10), run("adamw", 1, 4.05), run("adamw", 2, 4.15),
              run("sgd", 1, 6.0), run("sgd", 2, 6.2), run("adafactor", 1, 3.5), run("adafactor", 2, 3.6)]
    task_out = dict(sweep=finals, final=finals, best_lr={k: 1e-3 for k in ("came", "adamw", "sgd", "adafactor")})
    s = summarize_task(task_out)
    assert s["ranking"] == ["adafactor", "came", "adamw", "sgd"]
    pair = {(p["better"], p["worse"]): p["beyond_noise"] for p in s["pairs"]}
    assert pair[("came", "adamw")] is False and pair[("adamw", "sgd")] is True and pair[("adafactor", "came")] is True
    # paired by seed: CAME is 0.05 ahead of AdamW on each seed, so it keeps its order although the
    # min-max intervals overlap; a pair whose order flips on one seed is not consistent
    paired = {(p["better"], p["worse"]): (p["paired_diffs"], p["paired_consistent"]) for p in s["pairs"]}
    assert paired[("came", "adamw")][0] == pytest.approx([0.05, 0.05]) and paired[("came", "adamw")][1] is True
    flip = summarize_task(dict(sweep=finals[:2] + [run("adamw", 1, 3.95), run("adamw", 2, 4.2)],
                               final=finals[:2] + [run("adamw", 1, 3.95), run("adamw", 2, 4.2)],
                               best_lr={"came": 1e-3, "adamw": 1e-3}))
    assert flip["pairs"][0]["paired_consistent"] is False
    cmp = compare_with_paper(s)
    verdict = {(p["ours_better"], p["ours_worse"]): (p["paper_agrees"], p["beyond_noise"]) for p in cmp["pairs"]}
    assert verdict[("came", "adamw")] == (True, False)
    assert verdict[("adamw", "sgd")] == (True, True)
    assert verdict[("adafactor", "came")] == (False, True)  # the paper has CAME ahead of Adafactor
    assert cmp["n_pairs"] == 6


@pytest.mark.slow  # ~25 s of CPU, over a minute of wall time on the shared 2-core machine
def test_tiny_study_end_to_end_in_process(tmp_path):
    """The real pipeline on the tiny GPT: 2 optimizers x 2 lrs, 1 seed, 4 steps, zero-shot on a few documents."""
    from pretrain.study.study import inprocess_run

    tool = _tool()
    out = tmp_path / "report"
    argv = ["--optimizers", "adamw,adalomo", "--tasks", "gpt", "--gpt-config", str(ROOT / "configs/gpt_tiny.yaml"),
            "--budget-tokens", "1024", "--lrs-per-optimizer", "2", "--seeds", "1234", "--evals-per-run", "2",
            "--zeroshot-limit", "2", "--out", str(out), "--work-dir", str(tmp_path / "runs")]
    assert tool.main(argv, run_fn=inprocess_run) == 0
    data = json.loads((out / "results.json").read_text())
    gpt = data["study"]["tasks"]["gpt"]
    for key in ("adamw", "adalomo"):
        sweep = [r for r in gpt["sweep"] if r["key"] == key]
        assert len(sweep) == 2 and all(r["steps"] == 4 and not r["failed"] for r in sweep)
        assert gpt["best_lr"][key] == min(sweep, key=lambda r: r["final_val_loss"])["lr"]
        final = next(r for r in gpt["final"] if r["key"] == key)
        assert final["zeroshot"] and "heldout_cloze" in final["zeroshot"]
        assert len(final["val_curve"]) >= 2 and final["tokens_per_s"] > 0
    states = {r["key"]: r["optimizer_state_bytes"] for r in gpt["final"]}
    assert states["adamw"] > 4 * states["adalomo"] > 0  # two full moments vs factored second moments
    assert (out / "report.md").is_file() and (out / "memory_vs_loss_gpt.png").stat().st_size > 1000
    assert not any((tmp_path / "runs").rglob("model.pt"))  # checkpoints are removed after the zero-shot evaluation


def test_lr_center_option_moves_one_grid_and_rejects_bad_input():
    from pretrain.study.catalog import CATALOG

    tool = _tool()
    plan = tool.build_plan(tool.parse_args(["--optimizers", "came,adamw", "--tasks", "gpt", "--lr-center", "came=1e-4"]))
    lrs = {e.key: plan.lrs(e) for e in plan.entries}
    assert lrs["came"] == pytest.approx([1e-4 * 10**-0.5, 1e-4, 1e-4 * 10**0.5], rel=0.01)
    assert lrs["adamw"] == plan.lrs(CATALOG["adamw"])  # the others keep the catalog's centre
    for bad in ["came", "sgd=1", "came=-1", "came=abc"]:
        with pytest.raises(SystemExit, match="lr-center"):
            tool.build_plan(tool.parse_args(["--optimizers", "came,adamw", "--tasks", "gpt", "--lr-center", bad]))
