"""Experiment grids: papermill over parameter grids, resumable and parallel, with a summary.

A grid file (YAML) names a notebook, a base parameter file and the parameters to vary::

    notebook: notebooks/train.ipynb    # paths are relative to the project root (the cwd)
    params_file: params/demo.yaml      # base parameter file (must be valid on its own)
    product:                           # cartesian product of lists
      head: [ArcFace, CosFace]
      k: [1, 3]
    zip:                               # lists of equal length, varied together (a mapping,
      backbone_type: [timm, open_clip] #   or a list of mappings for several zipped groups)
      backbone: [resnet18, RN50]
    fixed: {epochs: 2}                 # overrides common to every run
    metric: mMP@5                      # metric to summarise
    metrics_file: eval.csv             # table the notebook writes into its run folder
    pick: last                         # last | best: which evaluation step of the table
    where: {mode: merged}              # optional row filter on the metrics table
    output_dir: outputs                # grid folder = <output_dir>/<name or file stem>/

Runs = product x zip groups (with neither, one run of ``fixed``). Each run is
papermill-executed with ``params_file``, its overrides, ``output_dir=<grid folder>`` and
``run_name=<run id>`` (and the resolved value of every flat parameter the notebook's
``parameters`` cell declares, so its defaults never shadow the base file), so the
notebook's run folder *is* the grid's run folder
``outputs/<grid>/<run id>/``: the executed notebook, ``params.yaml`` (resolved),
``overrides.yaml`` (what papermill injected), ``run.log`` (papermill and cell output),
the metrics file and ``status.json`` (written atomically: ``running`` -> ``finished`` |
``failed`` | ``interrupted``).

Run id = readable slug of the varied values + 8 hex digits of
``sha1(json({notebook, params_file, overrides}))``, e.g. ``head-ArcFace_k-3_1f0c2a9e``:
stable across invocations; editing the *base file* does not change it (start a new grid
name, or delete the folder, to recompute).

Validation happens in two stages:

* grid errors, raised as :class:`GridError` before any run starts: unknown keys, a
  parameter name that is neither a flat name of :mod:`unifex_lib.params` nor a name in
  the notebook's ``parameters`` cell (a misspelt axis), zip lists of unequal length,
  missing notebook, an invalid base file;
* run errors: a *value* that is bad for some runs only (``k: [0, 1]``) fails
  :func:`unifex_lib.params.load_params` for those runs, which are recorded ``failed``
  with the message (papermill is not started for them) while the grid goes on.

Re-running skips ``finished`` runs, skips ``failed`` ones unless ``retry_failed``, and
runs everything else (missing, ``interrupted``, or ``running`` left by a killed grid: a
lock file guarantees no other grid process owns the folder). The exit status of
:func:`main` is non-zero while any run of the grid is failed.
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pandas as pd
import yaml

from unifex_lib.params import FLAT_NAMES, ParamsError, closest, load_params, save_params
from unifex_lib.plots import save_figure

FINISHED, FAILED, RUNNING, INTERRUPTED, PENDING = "finished", "failed", "running", "interrupted", "pending"
STATUS_FILE = "status.json"
GRID_FILE = "grid.yaml"  # copy of the grid spec inside the grid folder, read by `summary`
SUMMARY_FILE = "summary.csv"
STEP_COLUMNS = ("step", "iteration", "epoch")  # evaluation-step columns of a metrics table, first found wins
_SET_BY_GRID = ("run_name", "output_dir", "params_file")


class GridError(ValueError):
    """The grid file is invalid; nothing was run."""


@dataclass
class Run:
    run_id: str
    values: dict  # the varied values (axes only)
    overrides: dict  # values + fixed: what the notebook receives besides params_file/run_name/output_dir


@dataclass
class Grid:
    name: str
    notebook: str
    params_file: Optional[str]
    metric: str
    metrics_file: str
    product: dict = field(default_factory=dict)
    zip: list = field(default_factory=list)
    fixed: dict = field(default_factory=dict)
    pick: str = "last"
    where: dict = field(default_factory=dict)
    output_dir: str = "outputs"

    @property
    def axes(self) -> dict:
        """Varied parameter -> its values, in file order (product first, then zip groups)."""
        out = dict(self.product)
        for group in self.zip:
            out.update(group)
        return out

    def runs(self) -> list[Run]:
        """Every run: product of the product axes and of each zip group (a group is one axis)."""
        factors = [[{name: v} for v in values] for name, values in self.product.items()]
        factors += [[dict(zip(group, vs)) for vs in zip(*group.values())] for group in self.zip]
        runs = []
        for combo in itertools.product(*factors):
            values = {k: v for part in combo for k, v in part.items()}
            overrides = {**self.fixed, **values}
            runs.append(Run(make_run_id(values, overrides, self.notebook, self.params_file), values, overrides))
        return runs


def _slug_part(value) -> str:
    """Filename-safe short text of a value; a list or mapping gives its non-None, non-bool items."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        value = "-".join(_slug_part(v) for v in value if v is not None and not isinstance(v, bool))
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(value)).strip("-")[:24] or "x"


def make_run_id(values: dict, overrides: dict, notebook: str, params_file: Optional[str]) -> str:
    """``<name>-<value>_..._<hash8>``; hash = sha1 of canonical JSON of notebook, params_file, overrides."""
    key = json.dumps({"notebook": notebook, "params_file": params_file, "overrides": overrides},
                     sort_keys=True, default=str)
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    slug = "_".join(f"{_slug_part(k)}-{_slug_part(v)}" for k, v in values.items())[:80] or "run"
    return f"{slug}_{digest}"


def load_grid(path, output_dir: Optional[str] = None) -> Grid:
    """Read and check a grid file's structure (names are checked by :func:`validate_grid`)."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise GridError(f"{path}: a grid file is a mapping, found {type(raw).__name__}")
    keys = [f.name for f in Grid.__dataclass_fields__.values()]
    problems = [f"unknown key '{k}'{closest(k, keys)}; valid keys: {', '.join(keys)}" for k in raw if k not in keys]
    problems += [f"missing key '{k}'" for k in ("notebook", "metric", "metrics_file") if k not in raw]
    raw.setdefault("name", path.stem)
    raw.setdefault("params_file", None)
    zipped = raw.get("zip") or []
    raw["zip"] = [zipped] if isinstance(zipped, dict) else zipped
    for key in ("product", "fixed", "where"):
        raw[key] = raw.get(key) or {}
        if not isinstance(raw[key], dict):
            problems.append(f"'{key}' must be a mapping of parameter -> value(s)")
    if not isinstance(raw["zip"], list) or not all(isinstance(g, dict) for g in raw["zip"]):
        problems.append("'zip' must be a mapping of parameter -> list, or a list of such mappings")
        raw["zip"] = []
    for name, values in list(raw["product"].items()) + [kv for g in raw["zip"] for kv in g.items()]:
        if not isinstance(values, list) or not values:
            problems.append(f"axis '{name}' must be a non-empty list, found {values!r}")
    for group in raw["zip"]:
        lengths = {k: len(v) for k, v in group.items() if isinstance(v, list)}
        if len(set(lengths.values())) > 1:
            problems.append(f"zipped lists must have equal lengths, found {lengths}")
    names = list(raw["product"]) + [k for g in raw["zip"] for k in g] + list(raw["fixed"])
    problems += [f"parameter '{n}' is set more than once (product/zip/fixed)" for n in sorted(set(names))
                 if names.count(n) > 1]
    problems += [f"parameter '{n}' is set by the grid itself; remove it" for n in names if n in _SET_BY_GRID]
    if raw.get("pick", "last") not in ("last", "best"):
        problems.append(f"pick={raw['pick']!r} is not valid; choose one of last, best")
    if problems:
        raise GridError(f"invalid grid file {path}:\n  - " + "\n  - ".join(problems))
    if output_dir is not None:
        raw["output_dir"] = output_dir
    return Grid(**raw)


def notebook_parameters(notebook) -> list[str]:
    """Names declared in the notebook's ``parameters`` cell."""
    import papermill

    return list(papermill.inspect_notebook(str(notebook)))


def validate_grid(grid: Grid, root=".") -> list[str]:
    """Grid-level checks (see module docstring), raising :class:`GridError` with every problem.

    Returns the names of the notebook's ``parameters`` cell.
    """
    root = Path(root)
    notebook = root / grid.notebook
    if not notebook.is_file():
        raise GridError(f"notebook not found: {notebook}")
    own = notebook_parameters(notebook)
    valid = set(FLAT_NAMES) | set(own)
    names = list(grid.axes) + list(grid.fixed)
    problems = [f"unknown parameter '{n}'{closest(n, valid)}" for n in names if n not in valid]
    if problems:
        raise GridError(f"invalid grid '{grid.name}':\n  - " + "\n  - ".join(problems) +
                        f"\nvalid names: the flat names of unifex_lib.params and the parameters of "
                        f"{grid.notebook}: {', '.join(own) or '(none)'}")
    if grid.params_file is not None:
        try:
            load_params(root / grid.params_file)
        except ParamsError as e:
            raise GridError(f"base parameter file {grid.params_file} is invalid on its own: {e}") from e
    return own


# -- run folders ----------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_status(run_dir) -> dict:
    """The run's status record, ``{"status": "pending"}`` if it never started."""
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {"status": PENDING}


def write_status(run_dir, record: dict) -> None:
    """Write ``status.json`` atomically (temporary file + rename)."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _clear_run_dir(run_dir: Path) -> None:
    """A (re)started run begins from an empty folder, so no stale metrics survive."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)


def _notebook_error(nb_path: Path) -> Optional[str]:
    """``"<ename>: <evalue> (cell N)"`` of the first error output of an executed notebook."""
    if not nb_path.is_file():
        return None
    for cell in json.loads(nb_path.read_text()).get("cells", []):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"{out.get('ename')}: {out.get('evalue')} (cell {cell.get('execution_count')})"
    return None


def _log_tail(log_path: Path) -> str:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()] if log_path.is_file() else []
    return lines[-1].strip() if lines else "(empty log)"


# -- metrics -------------------------------------------------------------------------------------------

def read_metrics(path, metric: str, pick: str = "last", where: Optional[dict] = None) -> tuple[dict, dict]:
    """``(mean metrics, {domain: metric})`` from a metrics table (CSV, or JSON record/list of records).

    Rows are filtered by ``where`` (column -> value); if a step column (``step``,
    ``iteration`` or ``epoch``) exists, the rows of one evaluation are kept: the last one
    (``pick="last"``) or the one with the highest mean ``metric`` (``pick="best"``). With a
    ``domain`` column, the row ``domain == "mean"`` (else the unweighted mean of the domain
    rows) gives the mean metrics and the other rows the per-domain ``metric``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        df = pd.DataFrame(data if isinstance(data, list) else [data])
    else:
        df = pd.read_csv(path)
    if metric not in df.columns:
        raise KeyError(f"metric '{metric}' not in {path}{closest(metric, df.columns)}; "
                       f"columns: {', '.join(df.columns)}")
    for col, value in (where or {}).items():
        if col not in df.columns:
            raise KeyError(f"where: column '{col}' not in {path}; columns: {', '.join(df.columns)}")
        df = df[df[col].astype(str) == str(value)]
    if df.empty:
        raise ValueError(f"no rows left in {path} after where={where}")
    step = next((c for c in STEP_COLUMNS if c in df.columns), None)
    has_domain = "domain" in df.columns
    keys = [c for c in (step, "domain") if c in df.columns]
    if keys and df.duplicated(keys).any():
        labels = {c: sorted(map(str, df[c].unique())) for c in df.select_dtypes(exclude="number").columns
                  if c != "domain" and df[c].nunique() > 1}
        raise ValueError(f"{path} has several rows per {' and '.join(keys)} ({labels}); "
                         f"select one with where: {{column: value}}")

    def mean_row(rows: pd.DataFrame) -> pd.Series:
        numeric = rows.select_dtypes("number")
        numeric = numeric.drop(columns=[c for c in STEP_COLUMNS if c in numeric.columns])
        if has_domain and (rows["domain"] == "mean").any():
            return numeric[rows["domain"] == "mean"].iloc[-1]
        return numeric[rows["domain"] != "mean"].mean() if has_domain else numeric.iloc[-1]

    if step:
        by_step = {s: mean_row(rows)[metric] for s, rows in df.groupby(step, sort=True)}
        chosen = max(by_step, key=by_step.get) if pick == "best" else list(by_step)[-1]
        df = df[df[step] == chosen]
    domains = {str(d): float(v) for d, v in zip(df["domain"], df[metric]) if d != "mean"} if has_domain else {}
    return {k: float(v) for k, v in mean_row(df).items()}, domains


# -- running -------------------------------------------------------------------------------------------

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # loaded before any fork


def _die_with_parent(parent_pid: int) -> None:
    """Child pre-exec: get SIGTERM when the grid process dies, even by SIGKILL (Linux prctl)."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:
        os._exit(1)


def detect_gpus() -> list[str]:
    """GPU ids a run may be pinned to: ``CUDA_VISIBLE_DEVICES`` entries, else 0..n-1 from torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@dataclass
class _Job:
    run: Run
    run_dir: Path
    proc: subprocess.Popen
    log: object
    record: dict
    env: dict
    started: float


def _start(run: Run, grid: Grid, root: Path, grid_dir: Path, params, notebook_params: list, env: dict,
           kernel: str) -> _Job:
    run_dir = grid_dir / run.run_id
    _clear_run_dir(run_dir)
    save_params(params, run_dir / "params.yaml")
    # every flat parameter the notebook declares gets its resolved value, so the notebook's own
    # defaults never shadow the base file: the notebook runs with exactly params.yaml
    flat = params.flat()
    names = [*notebook_params, *run.overrides, "run_name", "output_dir"]
    injected = {"params_file": grid.params_file, **run.overrides, **{n: flat[n] for n in names if n in flat}}
    (run_dir / "overrides.yaml").write_text(yaml.safe_dump(injected, sort_keys=False))
    cmd = [sys.executable, "-m", "papermill", str(root / grid.notebook), str(run_dir / Path(grid.notebook).name),
           "-f", str(run_dir / "overrides.yaml"), "--cwd", str(root), "-k", kernel,
           "--log-output", "--no-progress-bar"]
    log = open(run_dir / "run.log", "w")
    parent = os.getpid()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=root,
                            start_new_session=True, preexec_fn=lambda: _die_with_parent(parent))
    record = {"run_id": run.run_id, "status": RUNNING, "values": run.values, "overrides": run.overrides,
              "started": _now(), "pid": proc.pid, "host": os.uname().nodename,
              "device": {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")}}
    write_status(run_dir, record)
    return _Job(run, run_dir, proc, log, record, env, time.monotonic())


def _finish(job: _Job, grid: Grid) -> dict:
    job.log.close()
    rc = job.proc.returncode
    record = {**job.record, "ended": _now(), "duration_s": round(time.monotonic() - job.started, 2),
              "returncode": rc}
    if rc == 0:
        try:
            means, _ = read_metrics(job.run_dir / grid.metrics_file, grid.metric, grid.pick, grid.where)
            record.update(status=FINISHED, metric=grid.metric, value=means[grid.metric])
        except (OSError, KeyError, ValueError) as e:
            record.update(status=FAILED, error=f"notebook finished but its metrics are unusable: {e}")
    else:
        error = _notebook_error(job.run_dir / Path(grid.notebook).name)
        if error is None:
            killed = f"killed by {signal.Signals(-rc).name} (out of memory?); " if rc < 0 else ""
            error = f"{killed}papermill exit code {rc}: {_log_tail(job.run_dir / 'run.log')}"
        record.update(status=FAILED, error=error)
    write_status(job.run_dir, record)
    return record


def _stop(jobs: dict, reason: str) -> None:
    """Terminate running papermill process groups and mark their runs interrupted."""
    for job in jobs.values():
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(job.proc.pid, sig)
                job.proc.wait(wait)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
        job.log.close()
        write_status(job.run_dir, {**job.record, "status": INTERRUPTED, "ended": _now(), "error": reason})


def _lock(grid_dir: Path):
    """Exclusive lock on the grid folder, released when the process ends (even by SIGKILL)."""
    handle = open(grid_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise GridError(f"{grid_dir} is in use by another grid process") from None
    return handle


def _say(grid: Grid, msg: str) -> None:
    print(f"[{grid.name}] {msg}", flush=True)


def _run_all(grid: Grid, todo: list, notebook_params: list, root: Path, grid_dir: Path, slots: deque,
             kernel: str) -> None:
    """Validate each run's values (a bad one fails that run only), then run the rest, one per free slot."""
    queue, jobs, done = deque(), {}, 0
    for run in todo:
        try:
            queue.append((run, load_params(root / grid.params_file if grid.params_file else None,
                                           **{k: v for k, v in run.overrides.items() if k in FLAT_NAMES},
                                           run_name=run.run_id, output_dir=str(grid_dir))))
        except ParamsError as e:
            _clear_run_dir(grid_dir / run.run_id)
            write_status(grid_dir / run.run_id, {"run_id": run.run_id, "status": FAILED, "values": run.values,
                                                 "overrides": run.overrides, "started": _now(), "ended": _now(),
                                                 "duration_s": 0.0, "error": str(e)})
            done += 1
            _say(grid, f"[{done}/{len(todo)}] failed   {run.run_id}: {e}")
    try:
        while queue or jobs:
            while queue and slots:
                run, params = queue.popleft()
                env = slots.popleft()
                jobs[run.run_id] = _start(run, grid, root, grid_dir, params, notebook_params, env, kernel)
                _say(grid, f"started  {run.run_id} (gpu={env['CUDA_VISIBLE_DEVICES'] or '-'}, "
                           f"threads={env['OMP_NUM_THREADS']})")
            time.sleep(0.2)
            for run_id, job in list(jobs.items()):
                if job.proc.poll() is None:
                    continue
                record = _finish(jobs.pop(run_id), grid)
                slots.append(job.env)
                done += 1
                outcome = (f"{grid.metric}={record['value']:.4f}" if record["status"] == FINISHED
                           else record["error"])
                _say(grid, f"[{done}/{len(todo)}] {record['status']:8s} {run_id} in {record['duration_s']:.1f}s: "
                           f"{outcome}")
    except BaseException as e:  # KeyboardInterrupt, SystemExit from SIGTERM: leave no orphan runs
        _stop(jobs, f"grid interrupted: {type(e).__name__} {e}".strip())
        raise


def run_grid(path, workers: Optional[int] = None, gpus: Optional[list] = None, threads: Optional[int] = None,
             retry_failed: bool = False, root=".", output_dir: Optional[str] = None, dry_run: bool = False,
             kernel: str = "python3") -> pd.DataFrame:
    """Run every unfinished run of a grid file; return the summary table (also written to disk).

    Args:
        path: grid file (YAML, see module docstring).
        workers: parallel papermill processes; default one per GPU, or 1 on CPU.
        gpus: GPU ids to pin runs to (``CUDA_VISIBLE_DEVICES``, worker i -> ``gpus[i % len]``);
            ``None`` = detect, ``[]`` = CPU only (hides GPUs from the runs).
        threads: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` per run (torch's intra-op threads);
            default ``cpu_count // workers``.
        retry_failed: run failed runs again (finished runs are always kept).
        root: project root: notebooks run there, grid paths are relative to it.
        output_dir: overrides the grid file's ``output_dir``.
        dry_run: validate and return the table of runs and their status without running.
        kernel: Jupyter kernel name (``python3`` = the environment's own ipykernel).
    """
    root = Path(root).resolve()
    grid = load_grid(path, output_dir)
    notebook_params = validate_grid(grid, root)
    grid_dir = (root / grid.output_dir / grid.name).resolve()
    runs = grid.runs()
    if dry_run:
        return pd.DataFrame([{"run_id": r.run_id, "status": read_status(grid_dir / r.run_id)["status"], **r.values}
                             for r in runs])
    grid_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(grid_dir)
    try:
        todo = [r for r in runs if read_status(grid_dir / r.run_id)["status"] not in
                ((FINISHED,) if retry_failed else (FINISHED, FAILED))]
        _say(grid, f"{len(runs)} runs, {len(runs) - len(todo)} done or failed earlier, {len(todo)} to run "
                   f"-> {grid_dir}")
        (grid_dir / GRID_FILE).write_text(yaml.safe_dump(asdict(grid), sort_keys=False))
        gpus = detect_gpus() if gpus is None else [str(g) for g in gpus]
        workers = workers or max(1, len(gpus))
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        slots = deque({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)] if gpus else "", "OMP_NUM_THREADS": str(threads),
                       "MKL_NUM_THREADS": str(threads), "JUPYTER_PREFER_ENV_PATH": "1"} for i in range(workers))
        _run_all(grid, todo, notebook_params, root, grid_dir, slots, kernel)
    finally:
        lock.close()
    table = summarize(grid_dir)
    failed = table[table["status"] == FAILED]
    if len(failed):
        _say(grid, f"{len(failed)} of {len(table)} runs failed:\n" +
             "\n".join(f"  {r.run_id}: {r.error}" for r in failed.itertuples()))
    return table


# -- summary -------------------------------------------------------------------------------------------

def summarize(grid_dir, metric: Optional[str] = None, plots: bool = True) -> pd.DataFrame:
    """Summary of a grid folder: ``summary.csv`` and, with finished runs, the plots.

    One row per run of the saved grid spec (pending ones included): ``run_id``,
    ``status``, the varied parameters, the mean metrics, ``<metric>/<domain>`` columns,
    ``duration_s``, ``error``. Plots: ``metric_by_parameter.png`` (mean metric against each
    varied parameter, coloured by another) and ``domain_heatmap.png`` (runs x domains).
    """
    grid_dir = Path(grid_dir)
    spec = grid_dir / GRID_FILE
    if not spec.is_file():
        raise GridError(f"{grid_dir} is not a grid folder (no {GRID_FILE}); run the grid first")
    grid = Grid(**yaml.safe_load(spec.read_text()))
    metric = metric or grid.metric
    rows = []
    for run in grid.runs():
        status = read_status(grid_dir / run.run_id)
        row = {"run_id": run.run_id, "status": status["status"], **run.values}
        if status["status"] == FINISHED:
            means, domains = read_metrics(grid_dir / run.run_id / grid.metrics_file, metric, grid.pick, grid.where)
            row.update(means)
            row.update({f"{metric}/{d}": v for d, v in domains.items()})
        row.update(duration_s=status.get("duration_s"), error=status.get("error"))
        rows.append(row)
    table = pd.DataFrame(rows)
    table.to_csv(grid_dir / SUMMARY_FILE, index=False)
    if plots and (table["status"] == FINISHED).any():
        plot_summary(table, grid, metric, grid_dir)
    return table


def plot_summary(table: pd.DataFrame, grid: Grid, metric: str, out_dir) -> list[Path]:
    """Write ``metric_by_parameter.png`` and ``domain_heatmap.png``; return the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    done = table[table["status"] == FINISHED].copy()
    for a in grid.axes:  # categories by their slug (values may be lists or mappings)
        done[a] = done[a].map(_slug_part)
    varied = [a for a in grid.axes if done[a].nunique() > 1]
    written = []
    if varied:
        fig, axs = plt.subplots(1, len(varied), figsize=(4.5 * len(varied), 3.6), squeeze=False)
        for a, ax in zip(varied, axs[0]):
            hue = next((b for b in varied if b != a), None)
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid.axes[a])
            sns.pointplot(data=done, x=a, y=metric, hue=hue, dodge=0.3 if hue else False, errorbar=None, ax=ax,
                          order=[v for v in dict.fromkeys(map(_slug_part, grid.axes[a])) if v in set(done[a])],
                          linestyle="-" if numeric else "none")  # lines only along an ordered axis
            ax.set_title(f"{metric} by {a}")
            ax.tick_params(axis="x", rotation=0 if numeric else 30)
        fig.suptitle(f"grid {grid.name}: {len(done)} finished runs")
        written.append(save_figure(fig, Path(out_dir) / "metric_by_parameter.png", dpi=110))
    domain_cols = [c for c in done.columns if c.startswith(f"{metric}/")]
    if domain_cols:
        labels = done[varied].agg(", ".join, axis=1) if varied else done["run_id"]
        heat = done[domain_cols + [metric]].set_axis(labels).rename(
            columns=lambda c: c.split("/", 1)[1] if "/" in c else "mean")
        fig, ax = plt.subplots(figsize=(1.2 * heat.shape[1] + 3, 0.4 * len(heat) + 1.6))
        sns.heatmap(heat.astype(float), annot=True, fmt=".3f", cmap="viridis", ax=ax,
                    cbar_kws={"label": metric})
        ax.set_title(f"{metric} per domain ({grid.name})")
        ax.set_ylabel(", ".join(varied) or "run")
        written.append(save_figure(fig, Path(out_dir) / "domain_heatmap.png", dpi=110))
    return written


# -- command line --------------------------------------------------------------------------------------

def main(argv: Optional[list] = None) -> int:
    """``unifex-grid GRID.yaml [options]`` or ``unifex-grid summary GRID_DIR [--metric M]``."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summary"]:
        parser = argparse.ArgumentParser(prog="unifex-grid summary", description="Summarise an existing grid folder.")
        parser.add_argument("grid_dir", help="outputs/<grid>")
        parser.add_argument("--metric", help="metric to summarise (default: the grid's)")
        args = parser.parse_args(argv[1:])
        table = summarize(args.grid_dir, args.metric)
        print(table.drop(columns=["error"]).to_string(index=False))
        print(f"wrote {Path(args.grid_dir) / SUMMARY_FILE}")
        return 0
    parser = argparse.ArgumentParser(prog="unifex-grid", description="Run a parameter grid of a notebook "
                                     "(resumable); `unifex-grid summary DIR` summarises a grid folder.")
    parser.add_argument("grid", help="grid file, e.g. params/grids/heads.yaml")
    parser.add_argument("--workers", type=int, help="parallel runs (default: one per GPU, 1 on CPU)")
    parser.add_argument("--gpus", help="comma-separated GPU ids, or 'none' for CPU (default: detect)")
    parser.add_argument("--threads", type=int, help="threads per run (default: cpu_count // workers)")
    parser.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    parser.add_argument("--output-dir", help="overrides the grid file's output_dir")
    parser.add_argument("--root", default=".", help="project root (cwd of the notebooks)")
    parser.add_argument("--dry-run", action="store_true", help="list runs and their status, run nothing")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    gpus = None if args.gpus is None else [] if args.gpus == "none" else args.gpus.split(",")
    try:
        table = run_grid(args.grid, workers=args.workers, gpus=gpus, threads=args.threads,
                         retry_failed=args.retry_failed, root=args.root, output_dir=args.output_dir,
                         dry_run=args.dry_run)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(table.to_string(index=False))
    return int((table["status"] == FAILED).any())


if __name__ == "__main__":
    sys.exit(main())
