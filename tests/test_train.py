"""The training loop end to end on tiny demo data: checkpoint names, feature cache, kill/resume, DDP."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from unifex_lib.data.demo import generate_demo
from unifex_lib.params import load_params, save_params
from unifex_lib.train import load_checkpoint_model, train
from unifex_lib.training.checkpoint import list_checkpoints, load_weights, unprefixed

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: one thread is faster on a shared machine, and the kill/resume children use one too
    (the reference run must do the same arithmetic to give bit-identical weights)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # 4 domains x 4 train classes x 4 images = 64 train images; val: 4 x 2 x 4
    return generate_demo(tmp_path_factory.mktemp("demo"), seed=0, train_classes=4, val_classes=2, test_classes=2,
                         images_per_class=4, size=32)


def tiny_params(demo, out, run_name, **overrides):
    settings = dict(data_root=str(demo), output_dir=str(out), run_name=run_name, backbone_type="timm",
                    backbone="test_vit", pretrained=False, image_size=32, embedding_dim=8, head="ArcFace", k=1,
                    batch_size=16, epochs=2, lr=1e-2, eta_min=1e-4, warmup_epochs=0.5, device="cpu",
                    eval_batch_size=64, knn_backend="torch", log_every=1, seed=7)
    settings.update(overrides)
    return load_params(None, **settings)


def run_script(code: str, tmp_path, params, *launcher, **env) -> subprocess.CompletedProcess:
    save_params(params, tmp_path / "child.yaml")
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, *launcher, str(script), str(tmp_path / "child.yaml")],
                          env=dict(ENV, **env), capture_output=True, text=True, timeout=120)


CHILD = """
    import os, signal, sys
    import torch
    from unifex_lib.params import load_params
    from unifex_lib.train import train
    torch.set_num_threads(1)
    kill_at = int(os.environ.get("KILL_AT_STEP", "0"))
    if kill_at:
        calls, step = [0], torch.optim.Adam.step
        def killing_step(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return step(self, *args, **kwargs)
        torch.optim.Adam.step = killing_step
    train(load_params(sys.argv[1]))
"""


def test_cached_and_uncached_training_give_the_same_metrics_epoch_checkpoints(demo, tmp_path):
    runs = {cache: train(tiny_params(demo, tmp_path, f"cache_{cache}", feature_cache=cache, keep_last=1))
            for cache in (True, False)}
    assert len(list((tmp_path / "feature_cache").glob("*.f32"))) == 1
    a, b = (pd.read_csv(tmp_path / f"cache_{c}" / "eval.csv") for c in (True, False))
    pd.testing.assert_frame_equal(a[["R@1", "mMP@5"]], b[["R@1", "mMP@5"]], atol=1e-4, rtol=0)
    la, lb = (pd.read_csv(tmp_path / f"cache_{c}" / "history.csv").loss for c in (True, False))
    assert (la - lb).abs().max() < 1e-4
    assert runs[True]["final_metrics"] == pytest.approx(runs[False]["final_metrics"], abs=1e-4)
    # epoch mode: one checkpoint per epoch named by the epoch, keep_last=1 plus the best by mMP@5
    run, result = tmp_path / "cache_True", runs[True]
    means = a[a.domain == "mean"]
    assert means.step.tolist() == [4, 8] and result["steps"] == 8
    best = means.loc[means["mMP@5"].idxmax()]
    best_name = f"epoch_{int(best.step) // 4:04d}"
    assert result["best_value"] == pytest.approx(best["mMP@5"])
    assert Path(result["best_checkpoint"]).name == f"{best_name}.safetensors"
    assert [p.stem for p in list_checkpoints(run / "checkpoints")] == sorted({best_name, "epoch_0002"})
    assert all((run / f).is_file() for f in ("params.yaml", "train.log", "lr.png", "loss.png", "metric.png"))
    model, loaded = load_checkpoint_model(run)
    assert loaded.run_name == "cache_True"
    for k, v in unprefixed(load_weights(result["best_checkpoint"]), "model").items():
        assert torch.equal(model.state_dict()[k], v)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(demo, tmp_path):
    # 4 steps per epoch, checkpoints at steps 3, 6, 8; killed inside step 7 (epoch 1), resumed from step 6
    kw = dict(iterations=8, checkpoint_every=3, keep_last=5, dropout=0.2, feature_cache=False, optimizer="AdamW")
    params = tiny_params(demo, tmp_path / "a", "run", **kw)
    killed = run_script(CHILD, tmp_path, params, KILL_AT_STEP="7")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [p.stem for p in list_checkpoints(params.run_dir / "checkpoints")][-1] == "step_0000006"
    resumed = run_script(CHILD, tmp_path, tiny_params(demo, tmp_path / "a", "run", resume=True, **kw))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = tiny_params(demo, tmp_path / "b", "run", **kw)
    train(reference)
    # iteration mode: checkpoints named by the real step, every 3 steps and at the end
    assert [p.stem for p in list_checkpoints(reference.run_dir / "checkpoints")] == [
        "step_0000003", "step_0000006", "step_0000008"]
    a = load_weights(params.run_dir / "checkpoints" / "step_0000008.json")
    b = load_weights(reference.run_dir / "checkpoints" / "step_0000008.json")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "resumed from step_0000006 (step 6, epoch 1, position 2)" in (params.run_dir / "train.log").read_text()
    h = pd.read_csv(params.run_dir / "history.csv")
    assert h.step.tolist() == list(range(1, 9))
    assert h.loss.tolist() == pd.read_csv(reference.run_dir / "history.csv").loss.tolist()


def test_two_process_gloo_ddp_matches_one_process(demo, tmp_path):
    kw = dict(iterations=5, checkpoint_every=5, dropout=0.0, batch_size=16)
    one = tiny_params(demo, tmp_path / "one", "run", **kw)
    train(one)
    two = tiny_params(demo, tmp_path / "two", "run", **kw)
    save_params(two, tmp_path / "two.yaml")  # through the command line torchrun runs (docs/training.md)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "unifex_lib.train", str(tmp_path / "two.yaml"), "-p", "log_every", "2"],
                          env=ENV, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (pd.read_csv(p.run_dir / "history.csv") for p in (one, two))
    assert a.step.tolist() == b.step.tolist() == list(range(1, 6))
    assert (a.loss - b.loss).abs().max() < 1e-5
    assert len(list_checkpoints(two.run_dir / "checkpoints")) == 1  # rank 0 alone writes


@pytest.mark.parametrize("settings", [
    dict(sam=True, grad_clip=1.0, sampling="round_robin", schedule_step="epoch", warmup="exponential"),
    dict(head="Triplet", samples_per_class=4, optimizer="SGD", sampling="proportional"),
], ids=["sam_clip_round_robin", "triplet_pk_sgd"])
def test_optimizer_and_sampling_variants_train(demo, tmp_path, settings):
    result = train(tiny_params(demo, tmp_path, "variant", iterations=3, checkpoint_every=3, **settings))
    history = pd.read_csv(tmp_path / "variant" / "history.csv")
    assert result["steps"] == 3 and history.loss.notna().all() and set(result["final_metrics"]) == {"R@1", "mMP@5"}
