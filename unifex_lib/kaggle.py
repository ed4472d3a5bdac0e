"""Kaggle upload of a GUIEC export: a dataset holding ``saved_model.pt`` and a kernel that submits it.

The Google Universal Image Embedding Challenge is a code competition: a Kaggle notebook attached to
the competition writes ``/kaggle/working/submission.zip``. :func:`prepare_kaggle_upload` writes two
folders the ``kaggle`` CLI understands:

* ``<work>/dataset/``: ``saved_model.pt`` + ``dataset-metadata.json`` (``{"title", "id": "<owner>/<slug>",
  "licenses": [{"name": "CC0-1.0"}]}``);
* ``<work>/kernel/``: ``guiec_submission.py`` (copies the dataset's model into ``submission.zip``
  and checks it runs on a uint8 ``[1,3,H,W]`` image) + ``kernel-metadata.json``.

:func:`push_to_kaggle` then runs ``kaggle datasets create`` (or ``kaggle datasets version`` when
the dataset exists) and ``kaggle kernels push`` when credentials are present; without credentials
it prints what to run and returns. Credentials are only ever detected, never read into files,
printed or logged: output of the CLI is echoed with any key value masked.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Union

COMPETITION = "google-universal-image-embedding"
PLACEHOLDER_OWNER = "<your-kaggle-username>"
_SECRET_ENV = ("KAGGLE_KEY", "KAGGLE_API_TOKEN")

KERNEL_SCRIPT = '''"""GUIEC submission: copy the exported TorchScript model into /kaggle/working/submission.zip."""
import glob
import zipfile

import torch

model_path = sorted(glob.glob("/kaggle/input/*/saved_model.pt"))[0]
model = torch.jit.load(model_path, map_location="cpu").eval()
with torch.no_grad():
    y = model(torch.randint(0, 256, (1, 3, 123, 77), dtype=torch.uint8))
assert y.dtype == torch.float32 and y.ndim == 2 and y.shape[0] == 1 and y.shape[1] <= 64, (y.dtype, y.shape)
with zipfile.ZipFile("/kaggle/working/submission.zip", "w") as archive:
    archive.write(model_path, arcname="saved_model.pt")
print(f"submission.zip written from {model_path}; embedding shape {tuple(y.shape)}")
'''


def credential_source() -> Optional[str]:
    """Where Kaggle credentials would come from, or None. Only names the source; never reads a secret.

    Checked in the CLI's order: ``KAGGLE_API_TOKEN``, ``KAGGLE_USERNAME`` + ``KAGGLE_KEY``,
    ``~/.kaggle/access_token``, ``~/.kaggle/credentials.json`` (``kaggle auth login``), ``kaggle.json``
    in ``$KAGGLE_CONFIG_DIR``, ``~/.kaggle`` or ``~/.config/kaggle``.
    """
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN environment variable"
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY environment variables"
    home = Path.home()
    candidates = [home / ".kaggle" / name for name in ("access_token", "access_token.txt", "credentials.json")]
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        candidates.append(Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json")
    candidates += [home / ".kaggle" / "kaggle.json", home / ".config" / "kaggle" / "kaggle.json"]
    return next((str(p) for p in candidates if p.is_file()), None)


def kaggle_username() -> Optional[str]:
    """``KAGGLE_USERNAME``, else the ``username`` field of a kaggle.json (the key is not read out)."""
    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    dirs = [os.environ.get("KAGGLE_CONFIG_DIR"), Path.home() / ".kaggle", Path.home() / ".config" / "kaggle"]
    for folder in filter(None, dirs):
        path = Path(folder) / "kaggle.json"
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("username")
            except (OSError, ValueError):
                return None
    return None


def _write_json(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def prepare_kaggle_upload(model_path: Union[str, Path], work_dir: Union[str, Path], owner: Optional[str] = None,
                          dataset_slug: str = "unifex-guiec-model", kernel_slug: str = "unifex-guiec-submission",
                          title: str = "unifex GUIEC model") -> dict:
    """Write the dataset and kernel folders (see module docstring); returns their paths and ids.

    ``owner`` defaults to :func:`kaggle_username`, else the placeholder ``<your-kaggle-username>``
    (the metadata then needs editing before a push). Slugs are 6-50 characters, lowercase
    letters, digits and hyphens (Kaggle's rule for dataset slugs).
    """
    for slug in (dataset_slug, kernel_slug):
        if not (6 <= len(slug) <= 50 and all(c.isdigit() or c == "-" or "a" <= c <= "z" for c in slug)):
            raise ValueError(f"Kaggle slug {slug!r} must be 6-50 characters of a-z, 0-9 and '-'")
    owner = owner or kaggle_username() or PLACEHOLDER_OWNER
    work_dir = Path(work_dir)
    dataset_dir, kernel_dir = work_dir / "dataset", work_dir / "kernel"
    dataset_dir.mkdir(parents=True, exist_ok=True)
    kernel_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_path, dataset_dir / "saved_model.pt")
    dataset_id, kernel_id = f"{owner}/{dataset_slug}", f"{owner}/{kernel_slug}"
    _write_json(dataset_dir / "dataset-metadata.json",
                {"title": title, "id": dataset_id, "licenses": [{"name": "CC0-1.0"}]})
    (kernel_dir / "guiec_submission.py").write_text(KERNEL_SCRIPT)
    _write_json(kernel_dir / "kernel-metadata.json", {
        "id": kernel_id, "title": kernel_slug.replace("-", " "), "code_file": "guiec_submission.py",
        "language": "python", "kernel_type": "script", "is_private": True, "enable_gpu": False,
        "enable_internet": False, "dataset_sources": [dataset_id], "competition_sources": [COMPETITION],
        "kernel_sources": []})
    return {"owner": owner, "dataset_dir": str(dataset_dir), "kernel_dir": str(kernel_dir),
            "dataset_id": dataset_id, "kernel_id": kernel_id}


def kaggle_cli() -> list[str]:
    """The ``kaggle`` command: the one beside this Python's executable, else the one on PATH."""
    beside = Path(sys.executable).with_name("kaggle")
    found = str(beside) if beside.is_file() else shutil.which("kaggle")
    if found is None:
        raise FileNotFoundError("the kaggle CLI is not installed; `pip install kaggle` (it is in pyproject.toml)")
    return [found]


def push_commands(upload: dict, message: str, new_dataset: bool) -> list[list[str]]:
    """The CLI calls (without the executable) that upload the dataset and push the kernel."""
    dataset = (["datasets", "create", "-p", upload["dataset_dir"]] if new_dataset else
               ["datasets", "version", "-p", upload["dataset_dir"], "-m", message])
    return [dataset, ["kernels", "push", "-p", upload["kernel_dir"]]]


def _mask(text: str) -> str:
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "****")
    return text


def push_to_kaggle(upload: dict, message: str = "unifex export", new_dataset: Optional[bool] = None) -> dict:
    """Upload the folders of :func:`prepare_kaggle_upload` with the ``kaggle`` CLI, if credentials exist.

    ``new_dataset=None`` asks ``kaggle datasets status <id>`` whether the dataset exists (exit
    code 0) and then runs ``datasets version``, else ``datasets create``. Without credentials (or
    with the placeholder owner) it prints the commands to run and returns ``{"pushed": False}``.
    A failing CLI call raises ``RuntimeError`` with its (masked) output.
    """
    source = credential_source()
    shell = [" ".join(["kaggle"] + cmd) for cmd in push_commands(upload, message, new_dataset is not False)]
    if source is None or upload["owner"] == PLACEHOLDER_OWNER:
        problem = ("no Kaggle credentials found" if source is None else
                   f"credentials found ({source}) but no username for the dataset id")
        print(f"Kaggle push skipped: {problem}. To submit:\n"
              "  1. create an API token at https://www.kaggle.com/settings (API section), then either\n"
              "     export KAGGLE_API_TOKEN=<token>, or export KAGGLE_USERNAME=<user> KAGGLE_KEY=<key>,\n"
              "     or save kaggle.json in ~/.kaggle/ (chmod 600), or run `kaggle auth login`;\n"
              f"  2. set the owner '<user>' in {upload['dataset_dir']}/dataset-metadata.json and\n"
              f"     {upload['kernel_dir']}/kernel-metadata.json if it reads {PLACEHOLDER_OWNER};\n"
              "  3. run (use `datasets version -p ... -m MESSAGE` if the dataset already exists):\n"
              + "".join(f"       {line}\n" for line in shell)
              + f"  4. open the kernel on Kaggle and submit its submission.zip to the {COMPETITION} competition.")
        return {"pushed": False, "reason": problem, "commands": shell}
    kaggle = kaggle_cli()
    if new_dataset is None:
        status = subprocess.run(kaggle + ["datasets", "status", upload["dataset_id"]], capture_output=True, text=True)
        new_dataset = status.returncode != 0
    outputs = []
    for cmd in push_commands(upload, message, new_dataset):
        proc = subprocess.run(kaggle + cmd, capture_output=True, text=True)
        output = _mask(proc.stdout + proc.stderr).strip()
        print(f"$ kaggle {' '.join(cmd)}\n{output}")
        if proc.returncode != 0:
            raise RuntimeError(f"`kaggle {' '.join(cmd)}` failed (exit {proc.returncode}):\n{output}")
        outputs.append(output)
    return {"pushed": True, "credentials": source, "new_dataset": new_dataset, "outputs": outputs,
            "kernel_url": f"https://www.kaggle.com/code/{upload['kernel_id']}"}
