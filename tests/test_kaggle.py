"""Kaggle upload folders and push: guidance without credentials, the right CLI calls with them."""
import json
import subprocess
from pathlib import Path

import pytest

from unifex_lib import kaggle as K

SECRET = "s3cr3t-key-value-0123"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and no KAGGLE_* variables: no credentials anywhere."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "KAGGLE_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    model = tmp_path / "saved_model.pt"
    model.write_bytes(b"torchscript bytes")
    return model


class FakeCLI:
    """Records subprocess.run calls; `datasets status` answers with `status_rc`."""

    def __init__(self, status_rc=1, fail_on=None):
        self.calls, self.status_rc, self.fail_on = [], status_rc, fail_on

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        rc = self.status_rc if cmd[1:3] == ["datasets", "status"] else int(cmd[1:3] == self.fail_on)
        return subprocess.CompletedProcess(cmd, rc, stdout=f"echo {SECRET} done\n", stderr="")


def _all_written_text(folder: Path) -> str:
    return "".join(p.read_text(errors="ignore") for p in folder.rglob("*") if p.is_file())


def test_without_credentials_prints_guidance_and_calls_nothing(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no CLI call without credentials"))
    upload = K.prepare_kaggle_upload(home, tmp_path / "kaggle")
    assert K.credential_source() is None and upload["owner"] == K.PLACEHOLDER_OWNER
    result = K.push_to_kaggle(upload)
    out = capsys.readouterr().out
    assert result["pushed"] is False and "no Kaggle credentials found" in out
    assert "KAGGLE_API_TOKEN" in out and f"kaggle kernels push -p {upload['kernel_dir']}" in out
    assert f"kaggle datasets create -p {upload['dataset_dir']}" in out


def test_with_env_credentials_creates_dataset_and_pushes_kernel(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    fake = FakeCLI(status_rc=1)
    monkeypatch.setattr(subprocess, "run", fake)
    upload = K.prepare_kaggle_upload(home, tmp_path / "kaggle", dataset_slug="my-guiec-model")
    result = K.push_to_kaggle(upload)
    cli = K.kaggle_cli()
    assert fake.calls == [cli + ["datasets", "status", "alice/my-guiec-model"],
                          cli + ["datasets", "create", "-p", upload["dataset_dir"]],
                          cli + ["kernels", "push", "-p", upload["kernel_dir"]]]
    assert result["pushed"] and result["new_dataset"] and "KAGGLE_USERNAME" in result["credentials"]
    dataset = json.loads(Path(upload["dataset_dir"], "dataset-metadata.json").read_text())
    kernel = json.loads(Path(upload["kernel_dir"], "kernel-metadata.json").read_text())
    assert dataset["id"] == "alice/my-guiec-model" and dataset["licenses"] == [{"name": "CC0-1.0"}]
    assert kernel["dataset_sources"] == ["alice/my-guiec-model"]
    assert kernel["competition_sources"] == ["google-universal-image-embedding"]
    assert (Path(upload["kernel_dir"]) / kernel["code_file"]).is_file()
    assert Path(upload["dataset_dir"], "saved_model.pt").read_bytes() == b"torchscript bytes"
    out = capsys.readouterr().out
    assert SECRET not in out and SECRET not in _all_written_text(tmp_path / "kaggle") and "****" in out


def test_existing_dataset_gets_a_new_version(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    fake = FakeCLI(status_rc=0)
    monkeypatch.setattr(subprocess, "run", fake)
    upload = K.prepare_kaggle_upload(home, tmp_path / "kaggle", owner="bob")
    K.push_to_kaggle(upload, message="epoch 10")
    assert [c[1:] for c in fake.calls[1:]] == [["datasets", "version", "-p", upload["dataset_dir"], "-m", "epoch 10"],
                                               ["kernels", "push", "-p", upload["kernel_dir"]]]


def test_token_without_username_gives_guidance(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_API_TOKEN", SECRET)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("no CLI call without a username"))
    result = K.push_to_kaggle(K.prepare_kaggle_upload(home, tmp_path / "kaggle"))
    assert result["pushed"] is False and "no username" in capsys.readouterr().out


def test_username_from_kaggle_json_and_key_never_written(home, tmp_path, monkeypatch):
    config = Path.home() / ".kaggle" / "kaggle.json"
    config.parent.mkdir(parents=True)
    config.write_text(json.dumps({"username": "carol", "key": SECRET}))
    assert K.credential_source() == str(config) and K.kaggle_username() == "carol"
    upload = K.prepare_kaggle_upload(home, tmp_path / "kaggle")
    assert upload["dataset_id"] == "carol/unifex-guiec-model"
    assert SECRET not in _all_written_text(tmp_path / "kaggle")


def test_failing_cli_call_raises_with_masked_output(home, tmp_path, monkeypatch):
    monkeypatch.setenv("KAGGLE_USERNAME", "alice")
    monkeypatch.setenv("KAGGLE_KEY", SECRET)
    monkeypatch.setattr(subprocess, "run", FakeCLI(status_rc=1, fail_on=["kernels", "push"]))
    with pytest.raises(RuntimeError, match=r"kaggle kernels push .* failed \(exit 1\)") as err:
        K.push_to_kaggle(K.prepare_kaggle_upload(home, tmp_path / "kaggle"))
    assert SECRET not in str(err.value)


def test_bad_slug_is_refused(home, tmp_path):
    with pytest.raises(ValueError, match="slug 'Bad_Slug'"):
        K.prepare_kaggle_upload(home, tmp_path / "kaggle", dataset_slug="Bad_Slug")
