"""Experiment grids (issue 9): expansion, run ids, metrics tables, failures, resume after a kill.

The runs execute a tiny fixture notebook (written here with nbformat) under papermill: it
writes a metrics table by hand-worked formula, raises when ``fail`` is set and
waits while a ``hold`` file exists; a run costs one kernel start (~2-3 s).
"""
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from unifex_lib.grid import (FAILED, FINISHED, GridError, load_grid, read_metrics, read_status, run_grid,
                             validate_grid)

REPO = Path(__file__).resolve().parents[1]
PARAMETERS = '''params_file: str = "base.yaml"  # base parameter file
run_name: str = "run"  # set by the grid
output_dir: str = "outputs"  # set by the grid
k: int = 1  # metric scale
m: float = 9.9  # a default that the base file must win over
fail: bool = False  # raise in a cell
hold: str = ""  # wait (at most 60 s) while this file exists'''

# two evaluation epochs x domains a, b plus a mean row; R@1(domain) = w_domain * k * epoch, mMP@5 = R@1 / 2
BODY = '''import csv, json, os, time
with open(os.path.join(output_dir, run_name, "env.json"), "w") as f:
    json.dump({"m": m, **{k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}}, f)
t0 = time.monotonic()
while hold and os.path.exists(hold) and time.monotonic() - t0 < 60:
    time.sleep(0.05)
if fail:
    raise RuntimeError(f"forced failure for k={k}")
with open(os.path.join(output_dir, run_name, "metrics.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["epoch", "domain", "R@1", "mMP@5"])
    for epoch in (1, 2):
        r = {"a": 0.1 * k * epoch, "b": 0.2 * k * epoch}
        r["mean"] = (r["a"] + r["b"]) / 2
        for d, v in r.items():
            w.writerow([epoch, d, v, v / 2])'''


def write_fixture(tmp_path: Path, zipped: dict, name: str = "g") -> Path:
    """Fixture notebook, base params and a grid file zipping ``zipped``; returns the grid file."""
    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                           "display_name": "Python 3"}})
    nb.cells = [nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(BODY)]
    nbformat.write(nb, tmp_path / "fixture.ipynb")
    (tmp_path / "base.yaml").write_text("head: {k: 2, m: 0.25}\n")
    grid = {"notebook": "fixture.ipynb", "params_file": "base.yaml", "zip": zipped, "fixed": {"s": 20.0},
            "metric": "mMP@5", "metrics_file": "metrics.csv", "output_dir": "out"}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    return path


def run_cli(tmp_path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "unifex_lib.grid", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def statuses(grid_dir: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in grid_dir.glob("*/status.json")}


def test_expansion_and_run_ids(tmp_path):
    path = tmp_path / "x.yaml"
    spec = {"notebook": "nb.ipynb", "params_file": "p.yaml", "metric": "mMP@5", "metrics_file": "eval.csv",
            "product": {"head": ["ArcFace", "CosFace"], "k": [1, 3]},
            "zip": [{"lr": [0.1, 0.2], "eta_min": [0.01, 0.02]}], "fixed": {"epochs": 2}}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    grid = load_grid(path)
    runs = grid.runs()
    assert len(runs) == 2 * 2 * 2
    assert [r.values for r in runs[:2]] == [{"head": "ArcFace", "k": 1, "lr": 0.1, "eta_min": 0.01},
                                            {"head": "ArcFace", "k": 1, "lr": 0.2, "eta_min": 0.02}]
    assert runs[0].overrides == {"epochs": 2, **runs[0].values}
    assert runs[0].run_id.startswith("head-ArcFace_k-1_lr-0.1_eta-min-0.01_")
    assert len({r.run_id for r in runs}) == len(runs)
    assert [r.run_id for r in load_grid(path).runs()] == [r.run_id for r in runs]  # stable
    path.write_text(path.read_text().replace("epochs: 2", "epochs: 3"))
    assert load_grid(path).runs()[0].run_id != runs[0].run_id  # a fixed override is part of the id


@pytest.mark.parametrize("change, message", [
    ({"zip": {"hed": ["ArcFace"]}}, "unknown parameter 'hed' (did you mean 'head'?)"),
    ({"zip": {"k": [1, 2], "fail": [True]}}, "equal lengths"),
    ({"fixed": {"run_name": "x"}}, "set by the grid itself"),
    ({"metrik": "R@1"}, "unknown key 'metrik' (did you mean 'metric'?)"),
])
def test_grid_errors_before_any_run(tmp_path, change, message):
    grid = yaml.safe_load(write_fixture(tmp_path, {"k": [1]}).read_text())
    grid.update(change)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(grid))
    with pytest.raises(GridError, match=re.escape(message)):
        run_grid(tmp_path / "bad.yaml", root=tmp_path)
    assert not (tmp_path / "out").exists()


def test_grid_folder_is_locked(tmp_path):
    path = write_fixture(tmp_path, {"k": [1]})
    (tmp_path / "out" / "g").mkdir(parents=True)
    with open(tmp_path / "out" / "g" / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(GridError, match="in use by another grid process"):
            run_grid(path, root=tmp_path, gpus=[])


@pytest.mark.parametrize("grid_file", sorted((REPO / "params" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_grid_files_are_valid(grid_file):
    grid = load_grid(grid_file)
    validate_grid(grid, root=REPO)  # names against unifex_lib.params and the notebook's parameters cell
    assert len(grid.runs()) >= 2


def test_read_metrics_pick_and_where(tmp_path):
    rows = [(1, "merged", "a", 0.5), (1, "merged", "b", 0.7), (1, "merged", "mean", 0.6),
            (2, "merged", "a", 0.3), (2, "merged", "b", 0.5), (2, "merged", "mean", 0.4),
            (2, "separate", "a", 0.9), (2, "separate", "b", 0.9), (2, "separate", "mean", 0.9)]
    pd.DataFrame(rows, columns=["epoch", "mode", "domain", "mMP@5"]).to_csv(tmp_path / "e.csv", index=False)
    means, domains = read_metrics(tmp_path / "e.csv", "mMP@5", "last", {"mode": "merged"})
    assert means == {"mMP@5": 0.4} and domains == {"a": 0.3, "b": 0.5}
    means, domains = read_metrics(tmp_path / "e.csv", "mMP@5", "best", {"mode": "merged"})
    assert means == {"mMP@5": 0.6} and domains == {"a": 0.5, "b": 0.7}
    with pytest.raises(ValueError, match="several rows per epoch and domain"):
        read_metrics(tmp_path / "e.csv", "mMP@5")
    (tmp_path / "m.json").write_text('{"R@1": 0.25, "mMP@5": 0.125}')  # no domain rows: one record
    assert read_metrics(tmp_path / "m.json", "R@1") == ({"R@1": 0.25, "mMP@5": 0.125}, {})
    with pytest.raises(KeyError, match="metric 'mMP@10' not in"):
        read_metrics(tmp_path / "m.json", "mMP@10")


def test_grid_with_failures_resumes_and_summarises(tmp_path):
    # k=3 raises in a cell; k=0 is a bad value for that run only (k >= 1): recorded, not a crash
    path = write_fixture(tmp_path, {"k": [1, 2, 3, 0], "fail": [False, False, True, False]})
    table = run_grid(path, workers=2, gpus=["7", "8"], threads=1, root=tmp_path)  # fake GPU ids: not used
    grid_dir = tmp_path / "out" / "g"
    runs = {r.values["k"]: r.run_id for r in load_grid(path).runs()}
    st = statuses(grid_dir)
    assert [st[runs[k]]["status"] for k in (1, 2, 3, 0)] == [FINISHED, FINISHED, FAILED, FAILED]
    assert st[runs[3]]["error"].startswith("RuntimeError: forced failure for k=3")
    assert "k=0 must be >= 1" in st[runs[0]]["error"]
    # worker i pins its runs to gpus[i]: the two first runs ran side by side on different GPUs
    env = {k: json.loads((grid_dir / runs[k] / "env.json").read_text()) for k in (1, 2, 3)}
    assert {env[1]["CUDA_VISIBLE_DEVICES"], env[2]["CUDA_VISIBLE_DEVICES"]} == {"7", "8"}
    assert env[3]["CUDA_VISIBLE_DEVICES"] in ("7", "8") and {e["OMP_NUM_THREADS"] for e in env.values()} == {"1"}
    assert {e["m"] for e in env.values()} == {0.25}  # resolved from the base file, not the notebook's 9.9
    for k in (1, 2, 3):
        run_dir = grid_dir / runs[k]
        assert {"fixture.ipynb", "params.yaml", "overrides.yaml", "run.log"} <= {p.name for p in run_dir.iterdir()}
        head = yaml.safe_load((run_dir / "params.yaml").read_text())["head"]  # resolved: base <- fixed <- axis
        assert (head["k"], head["s"], head["head"]) == (k, 20.0, "ArcFace")
    # summary: every run; mMP@5 of the last epoch = (0.2k + 0.4k)/2/2, per domain a = 0.1k, b = 0.2k
    assert len(table) == 4 and list(table["run_id"]) == list(runs.values())
    ok = table.set_index("k").loc[[1, 2]]
    assert ok["mMP@5"].tolist() == pytest.approx([0.15, 0.30])
    assert ok["mMP@5/a"].tolist() == pytest.approx([0.1, 0.2])
    assert ok["mMP@5/b"].tolist() == pytest.approx([0.2, 0.4])
    assert pd.read_csv(grid_dir / "summary.csv").shape[0] == 4
    assert (grid_dir / "metric_by_parameter.png").is_file() and (grid_dir / "domain_heatmap.png").is_file()
    # second invocation (the command line): nothing new runs, failures still reported, exit code 1
    proc = run_cli(tmp_path, "g.yaml", "--workers", "2", "--gpus", "none")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "0 to run" in out and "2 of 4 runs failed" in out and runs[3] in out
    assert statuses(grid_dir) == st
    # --retry-failed: the failed runs run (and fail) again, finished ones are kept
    run_grid(path, workers=2, gpus=[], threads=1, root=tmp_path, retry_failed=True)
    again = statuses(grid_dir)
    assert {k: again[runs[k]] == st[runs[k]] for k in (1, 2, 3)} == {1: True, 2: True, 3: False}
    assert again[runs[3]]["status"] == FAILED and again[runs[3]]["pid"] != st[runs[3]]["pid"]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="orphan check reads /proc")
def test_killed_grid_completes_only_missing_runs(tmp_path):
    path = write_fixture(tmp_path, {"k": [1, 2, 3, 4], "hold": ["", "hold", "", ""]})
    (tmp_path / "hold").touch()  # run k=2 waits until the grid is killed
    runs = [r.run_id for r in load_grid(path).runs()]
    grid_dir = tmp_path / "out" / "g"
    proc = run_cli(tmp_path, "g.yaml", "--workers", "2", "--gpus", "none", "--threads", "1")
    deadline = time.monotonic() + 60
    while read_status(grid_dir / runs[0])["status"] != FINISHED:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    first = read_status(grid_dir / runs[0])
    left = read_status(grid_dir / runs[1])
    assert left["status"] == "running"  # a killed grid leaves it so: counted as not finished
    for _ in range(50):  # its papermill died with the grid (no orphan writing into the folder)
        if not _alive(left["pid"]):
            break
        time.sleep(0.1)
    assert not _alive(left["pid"])
    (tmp_path / "hold").unlink()
    proc = run_cli(tmp_path, "g.yaml", "--workers", "2", "--gpus", "none", "--threads", "1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "1 done or failed earlier, 3 to run" in out
    assert read_status(grid_dir / runs[0]) == first
    assert [read_status(grid_dir / r)["status"] for r in runs] == [FINISHED] * 4
    assert pd.read_csv(grid_dir / "summary.csv")["mMP@5"].tolist() == pytest.approx([0.15 * k for k in (1, 2, 3, 4)])
