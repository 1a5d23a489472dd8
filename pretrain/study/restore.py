"""Put the runs a committed report holds back into the study's work directory.

The run directories (``--work-dir``, git-ignored) exist only on the machine that trained them;
what is committed is the report directory: results.json (every run's result, spec included) and
raw/<task>/<run>/metrics.jsonl. A study resumed from a fresh clone would otherwise retrain every
finished run, and ``--report-only`` there would overwrite the committed report with an empty one.
``restore_runs`` writes each stored run back as <work_dir>/<task>/<run>/result.json (+ its
metrics.jsonl), with its output_dir moved to the new work directory; the study's usual spec
check (``study.same_spec``) then decides, run by run, whether it is reused or retrained, so a
report made with other settings never stands in for runs it did not make.
"""
from __future__ import annotations

import json
from pathlib import Path

# keys the study adds to a result after the worker wrote it; the restored file is the worker's
_STUDY_KEYS = ("reused", "reused_from_sweep", "restored_from")


def stored_runs(results: dict) -> list[tuple[str, dict]]:
    """(task name, result) of every distinct training run in a results.json, crashed ones left out
    (a worker that died wrote no result: such a run must be trained again)."""
    out, seen = [], set()
    for task, t in results.get("study", {}).get("tasks", {}).items():
        for r in t.get("sweep", []) + t.get("final", []):
            if r.get("kind") != "train" or r.get("missing") or r.get("error") or (task, r["name"]) in seen:
                continue
            seen.add((task, r["name"]))
            out.append((task, r))
    return out


def restore_runs(report_dir: Path, work_dir: Path) -> int:
    """Write the report's finished runs into ``work_dir`` where that has no result for them yet.
    Returns how many were restored (0 when there is no report)."""
    path = Path(report_dir) / "results.json"
    if not path.is_file():
        return 0
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: {path} is not valid JSON ({e}); restore it from git or pass another --out")
    restored = 0
    for task, r in stored_runs(results):
        dst = Path(work_dir) / task / r["name"]
        if (dst / "result.json").is_file():
            continue  # this machine's own run wins
        old_dir = r["output_dir"]
        text = json.dumps({k: v for k, v in r.items() if k not in _STUDY_KEYS})
        result = json.loads(text.replace(json.dumps(old_dir)[1:-1], json.dumps(str(dst))[1:-1]))
        result["restored_from"] = str(path)
        dst.mkdir(parents=True, exist_ok=True)
        metrics = Path(report_dir) / "raw" / task / r["name"] / "metrics.jsonl"
        if metrics.is_file():
            (dst / "metrics.jsonl").write_bytes(metrics.read_bytes())
        (dst / "result.json").write_text(json.dumps(result, indent=1))
        restored += 1
    return restored
