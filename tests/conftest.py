"""Shared test setup: offline hub, few threads, tiny generated demo data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402

TINY_DEMO = dict(train_classes=4, val_classes=2, test_classes=3, images_per_class=3, size=32)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """A tiny demo dataset (4 domains, 4/2/3 train/val/test classes, 3 images each, 32 px)."""
    from unifex_lib.data.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, **TINY_DEMO)
