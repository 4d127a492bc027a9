"""Does a refactor change what training computes? Trains the same teacher and MVKT
memory-bank student with this tree and with an earlier commit, and compares metrics.jsonl.

    python tests/behaviour_check.py --before=6f8e9b6 --out=/tmp/behaviour

The earlier commit is checked out in a git worktree under --out; both trees train on
shards of the embedded PTB-XL sample (prepared once, by this tree), with fixed seeds, on
CPU, each in its own subprocess. Checked:

1. teacher and student metrics.jsonl rows are equal, every value bitwise (timing columns
   left out: they differ between identical runs);
2. a teacher run folder written by the earlier commit, stopped at step 3, resumes under
   this tree's command and ends with the same rows as this tree's uninterrupted run;
3. this tree evaluates the earlier commit's finished student folder.

Command-line names differ where the config layout changed (``teacher_workdir`` ->
``teacher.runs``, the teacher's net in ``student.*`` -> ``teacher.*``): each tree gets its
own spelling of the same settings. Prints one line per check and writes ``result.json``;
exits 1 when a check fails.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMING_KEYS = {"step_time_s", "samples_per_s"}
COMMON = ["--config.train.batch_size=32", "--config.train.epochs=2", "--config.train.log_every_steps=1",
          "--config.eval.batch_size=64", "--config.clt.num_negatives=16", "--config.student.width_mult=0.25"]

_BEFORE = flags.DEFINE_string("before", None, "the earlier commit (e.g. the one before a refactor)", required=True)
_OUT = flags.DEFINE_string("out", "/tmp/mvkt-behaviour-check", "working folder (worktree, shards, runs)")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 900, "hard limit for each subprocess")


def _run(tree: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, *args], cwd=tree, env=env, capture_output=True, text=True,
                            timeout=_TIMEOUT.value)
    if result.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(args[:3])} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _is_new_layout(tree: pathlib.Path) -> bool:
    return "config.teacher = ml_collections.ConfigDict()" in (tree / "experiments/configs/default.py").read_text()


def _train(tree: pathlib.Path, role: str, workdir: pathlib.Path, shards: pathlib.Path,
           teacher: pathlib.Path | None = None, *extra: str) -> None:
    args = ["-m", "experiments.train", f"--config=experiments/configs/{role}.py", f"--workdir={workdir}",
            f"--config.data.dir={shards}", *COMMON, *extra]
    new = _is_new_layout(tree)
    if role == "teacher" and new:
        args.append("--config.teacher.width_mult=0.25")
    if teacher is not None:
        args += [f"--config.teacher.runs={teacher}" if new else f"--config.teacher_workdir={teacher}",
                 "--config.method=mvkt", "--config.clt.variant=memory_bank"]
    _run(tree, *args)


def _rows(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines if line.strip()]


def _compare(name: str, a: list[dict], b: list[dict]) -> dict:
    differences = [(i, k, ra.get(k), rb.get(k)) for i, (ra, rb) in enumerate(zip(a, b))
                   for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    ok = len(a) == len(b) and not differences
    values = sum(len(r) for r in a)
    print(f"{'PASS' if ok else 'FAIL'} {name}: {len(a)} vs {len(b)} rows, {values} values, "
          f"{len(differences)} different{'' if ok else ': ' + repr(differences[:5])}")
    return {"check": name, "ok": ok, "rows": [len(a), len(b)], "values": values, "differences": differences[:20]}


def main(argv):
    del argv
    out = pathlib.Path(_OUT.value).absolute()
    out.mkdir(parents=True, exist_ok=True)
    before = out / "before_tree"
    if not before.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before), _BEFORE.value],
                       check=True, capture_output=True, timeout=120)
    shards = out / "shards"
    if not (shards / "manifest.json").exists():
        _run(REPO, "-m", "data_prep.ptbxl", f"--src={REPO / 'data_prep/samples/ptbxl'}", f"--out={shards}",
             "--task=superdiagnostic")
    runs = {}
    for label, tree in (("before", before), ("after", REPO)):
        teacher, student = out / label / "teacher", out / label / "student"
        if not (teacher / "metrics.jsonl").exists():
            _train(tree, "teacher", teacher, shards)
        if not (student / "metrics.jsonl").exists():
            _train(tree, "student", student, shards, teacher)
        runs[label] = {"teacher": _rows(teacher), "student": _rows(student)}
    results = [_compare(f"{role} metrics.jsonl, {_BEFORE.value} vs this tree", runs["before"][role],
                        runs["after"][role]) for role in ("teacher", "student")]

    resumed = out / "resumed_teacher"
    if not (resumed / "metrics.jsonl").exists():
        _train(before, "teacher", resumed, shards, None, "--config.train.stop_at_step=3")
    _train(REPO, "teacher", resumed, shards)
    results.append(_compare("teacher written by the earlier commit (stopped at step 3), resumed by this tree",
                            _rows(resumed), runs["after"]["teacher"]))

    evaluated = _run(REPO, "-m", "experiments.evaluate", f"--workdir={out / 'before' / 'student'}", "--split=test",
                     "--bootstrap_resamples=50")
    ok = (out / "before" / "student" / "eval_test.json").exists()
    print(f"{'PASS' if ok else 'FAIL'} this tree evaluates the earlier commit's student folder")
    results.append({"check": "evaluate an earlier run folder", "ok": ok, "output": evaluated.stdout[-500:]})
    (out / "result.json").write_text(json.dumps({"before": _BEFORE.value, "checks": results}, indent=2))
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
