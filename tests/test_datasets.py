"""MNIST, Fashion-MNIST and GTSRB datamodules on the real data, CIFAR-10's on an archive written here (skipped when it is absent), the
decoding cache, the missing-data error, and the CNN through vectorised training.

The data is read from ``$AUROR_DATA_DIR``, else from ``../shared/datasets``
next to the repository. Caches always go to ``tmp_path``.
"""

import copy
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import datamodules.gtsrb as gtsrb
from datamodules.data_root import DatasetMissingError, resolve_cache_dir, resolve_data_root
from datamodules.gtsrb import GTSRBDataModule, cache_path, decode_images
from datamodules.cifar10 import CIFAR10DataModule
from datamodules.fashion_mnist import FashionMNISTDataModule
from datamodules.mnist import MNISTDataModule
from lightning_modules.cnn import CNNClassifier
from pipeline.core.local_training import train_users, user_batches

DATA_ROOT = Path(os.environ.get("AUROR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "datasets")
USERS = dict(num_users=3, malicious_fraction=0.34, seed=0)


def needs(subfolder: str) -> Path:
    if not (DATA_ROOT / subfolder).is_dir():
        pytest.skip(f"dataset folder {DATA_ROOT / subfolder} is absent (set AUROR_DATA_DIR to a torchvision-layout copy)")
    return DATA_ROOT


@pytest.fixture
def mnist_root():
    return needs("MNIST/raw")


@pytest.fixture
def fashion_mnist_root():
    return needs("FashionMNIST/raw")


@pytest.fixture
def gtsrb_root():
    return needs("gtsrb/GTSRB")


@pytest.fixture
def gtsrb_subset(monkeypatch):
    """Every 400th image of each split (~98 train, ~32 test), so decoding takes milliseconds."""
    full = gtsrb.gtsrb_samples
    monkeypatch.setattr(gtsrb, "gtsrb_samples", lambda *args, **kwargs: full(*args, **kwargs)[::400])


# --- data root ---------------------------------------------------------------------------------------------------

def test_resolve_data_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUROR_DATA_DIR", str(tmp_path))
    assert resolve_data_root("somewhere/else") == tmp_path
    monkeypatch.setenv("AUROR_DATA_DIR", "")
    assert resolve_data_root("somewhere/else") == Path("somewhere/else")
    monkeypatch.delenv("AUROR_DATA_DIR")
    assert resolve_data_root("somewhere/else") == Path("somewhere/else")


def test_resolve_cache_dir_prefers_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("AUROR_CACHE_DIR", str(tmp_path / "env"))
    assert resolve_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("AUROR_CACHE_DIR")
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "auror"


# --- MNIST -------------------------------------------------------------------------------------------------------

def test_mnist_loads_scaled_flat_images(mnist_root):
    data = MNISTDataModule(**USERS, root=mnist_root)
    data.prepare_data()  # download=False: nothing to do
    data.setup()
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.train_x.min() == 0 and data.train_x.max() == 1
    assert set(data.clean_train_y.unique().tolist()) == set(range(10)) == set(data.test_y.unique().tolist())
    assert sum(len(i) for i in data.user_indices) == 60000


def test_fashion_mnist_loads_its_own_files(fashion_mnist_root, mnist_root):
    data = FashionMNISTDataModule(**USERS, root=fashion_mnist_root)
    data.setup()
    assert data.train_x.shape == (60000, 784) and data.test_x.shape == (10000, 784)
    assert data.train_x.min() == 0 and data.train_x.max() == 1
    assert set(data.clean_train_y.unique().tolist()) == set(range(10)) == set(data.test_y.unique().tolist())
    assert (data.test_y.bincount() == 1000).all()  # Fashion-MNIST's balanced test set (MNIST's is not)
    digits = MNISTDataModule(**USERS, root=mnist_root)
    digits.setup()
    assert not torch.equal(data.test_x[:100], digits.test_x[:100])


@pytest.mark.slow
def test_fashion_mnist_config_runs_lenet5_end_to_end(fashion_mnist_root, tmp_path, monkeypatch):
    """configs/fashion_mnist.yaml on the real data, two rounds: LeNet-5's three arms, shirt -> T-shirt."""
    import json

    from pipeline.experiment.cli import main
    from pipeline.experiment.config import load_config

    config = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist.yaml"
    cfg = load_config(config)
    assert (cfg.training.model, cfg.attack.source_class, cfg.attack.target_class) == ("lenet5", 6, 0)
    monkeypatch.setenv("AUROR_DATA_DIR", str(fashion_mnist_root))
    monkeypatch.chdir(tmp_path)
    overrides = ["users.num_users=10", "training.rounds=2", "defense.auror.window_rounds=2", "training.device=cpu"]
    assert main(["run", "--params", str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    results = json.loads((tmp_path / "reports" / "latest.json").read_text())
    assert set(results) == {"benign", "attack", "auror"}
    assert results["benign"]["accuracy"] > 0.6  # LeNet-5 learns Fashion-MNIST in two rounds
    assert results["attack"]["attack_success_rate"] > results["benign"]["attack_success_rate"]


# --- CIFAR-10, on a small archive in its own format -------------------------------------------------------------

def write_cifar10(root: Path, per_batch: int = 12, test: int = 20, seed: int = 0) -> dict:
    """``root/cifar-10-batches-py`` as torchvision's archive unpacks it (pickled dicts of ``data`` (N, 3072)
    uint8, channel-major, and ``labels``), ``per_batch`` images in each of the 5 training batches."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name, n in [*((f"data_batch_{i}", per_batch) for i in range(1, 6)), ("test_batch", test)]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.permutation(np.arange(n) % 10)], b"batch_label": name.encode()}
        (folder / name).write_bytes(pickle.dumps(batch))
        written[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"airplane", b"automobile", b"bird",
        b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]}))
    return written


def test_cifar10_reads_its_batches_channel_major_and_normalised(tmp_path, monkeypatch):
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)  # it would override root
    written = write_cifar10(tmp_path)
    data = CIFAR10DataModule(**USERS, root=tmp_path)
    data.setup()
    assert data.train_x.shape == (60, 3, 32, 32) and data.test_x.shape == (20, 3, 32, 32)
    first = written["data_batch_1"][b"data"][0].astype(np.float32) / 255  # image 0: red plane, then green, blue
    pixel = (first[1 * 1024 + 5 * 32 + 7] - float(data.mean_[1])) / float(data.std_[1])  # channel 1, row 5, col 7
    assert data.train_x[0, 1, 5, 7].item() == pytest.approx(pixel, rel=1e-5)
    labels = [y for i in range(1, 6) for y in written[f"data_batch_{i}"][b"labels"]]
    assert data.clean_train_y.tolist() == labels and data.test_y.tolist() == written["test_batch"][b"labels"]
    std, mean = torch.std_mean(data.train_x, dim=(0, 2, 3))
    torch.testing.assert_close(mean, torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(std, torch.ones(3), atol=1e-4, rtol=0)


def test_cifar10_damaged_batch_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    from datamodules.data_root import DatasetCorruptError

    with pytest.raises(DatasetCorruptError, match="CIFAR-10") as error:
        CIFAR10DataModule(**USERS, root=tmp_path).setup()
    assert "\n" not in str(error.value) and str(tmp_path / "cifar-10-batches-py") in str(error.value)


def test_cifar10_config_runs_end_to_end_on_the_archive(tmp_path, monkeypatch, capsys):
    """configs/cifar10.yaml, shrunk: ResNet-8's three arms train on the written archive."""
    import json

    from pipeline.experiment.cli import main

    write_cifar10(tmp_path / "data", per_batch=16)
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    config = Path(__file__).resolve().parents[1] / "configs" / "cifar10.yaml"
    overrides = ["data.root=data", "data.download=false", "users.num_users=4", "users.malicious_fraction=0.25",
                 "training.rounds=2", "defense.auror.window_rounds=2", "training.device=cpu"]
    assert main(["run", "--params", str(config), *(a for o in overrides for a in ("--set", o))]) == 0
    results = json.loads((tmp_path / "reports" / "latest.json").read_text())
    assert set(results) == {"benign", "attack", "auror"}
    assert all(0 <= results[arm]["accuracy"] <= 1 for arm in results)


# --- GTSRB decoding and cache --------------------------------------------------------------------------------------

def test_decode_images_reads_ppm_like_pil(gtsrb_root):
    paths = sorted((gtsrb_root / "gtsrb/GTSRB/Training").glob("000[0-4]?/*_00000.ppm"))[:20]
    expected = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in paths])
    decoded = decode_images(paths)
    assert decoded.shape == (len(paths), 3, 32, 32) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, expected)


def test_decode_images_resizes_other_sizes_and_formats(tmp_path):
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))
    big.save(tmp_path / "big.ppm")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "grey.png")
    decoded = decode_images([tmp_path / "big.ppm", tmp_path / "grey.png"])
    assert decoded.shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(decoded[0], np.asarray(big.resize((32, 32), Image.BILINEAR)).transpose(2, 0, 1))
    assert (decoded[1, 0] == decoded[1, 2]).all()  # grey became RGB


def test_gtsrb_subset_is_normalised_and_cached(gtsrb_root, gtsrb_subset, tmp_path, monkeypatch):
    data = GTSRBDataModule(**USERS, root=gtsrb_root, cache_dir=tmp_path)
    data.prepare_data()
    assert len(list(tmp_path.glob("gtsrb-*.pt"))) == 2
    data.setup()
    assert data.train_x.shape[1:] == (3, 32, 32) == data.test_x.shape[1:] == GTSRBDataModule.input_shape
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    # normalised with the training set's own per-channel statistics
    torch.testing.assert_close(data.train_x.mean((0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(data.train_x.std((0, 2, 3)), torch.ones(3), atol=1e-4, rtol=0)
    assert torch.isfinite(data.test_x).all()
    for labels in (data.clean_train_y, data.test_y):
        assert 0 <= labels.min() and labels.max() < 43 and len(labels.unique()) > 10

    # the second load only reads the cache
    monkeypatch.setattr(gtsrb, "decode_images", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    again = GTSRBDataModule(**USERS, root=gtsrb_root, cache_dir=tmp_path)
    again.setup()
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.test_y, data.test_y)


def test_cache_name_depends_on_files_and_split(tmp_path):
    samples = [("/d/gtsrb/a.ppm", 0), ("/d/gtsrb/b.ppm", 1)]
    name = cache_path(tmp_path, Path("/d/gtsrb"), "train", samples)
    assert name.parent == tmp_path and name.name.startswith("gtsrb-train-")
    assert name == cache_path(tmp_path, Path("/d/gtsrb"), "train", list(samples))
    assert name != cache_path(tmp_path, Path("/d/gtsrb"), "train", samples[:1])
    assert name != cache_path(tmp_path, Path("/e/gtsrb"), "train", samples)


# --- missing data --------------------------------------------------------------------------------------------------

def make(name, root, download, cache_dir):
    if name == "MNIST":
        return MNISTDataModule(**USERS, root=root, download=download)
    if name == "Fashion-MNIST":
        return FashionMNISTDataModule(**USERS, root=root, download=download)
    if name == "CIFAR-10":
        return CIFAR10DataModule(**USERS, root=root, download=download)
    return GTSRBDataModule(**USERS, root=root, download=download, cache_dir=cache_dir)


@pytest.mark.parametrize("name", ["MNIST", "Fashion-MNIST", "GTSRB", "CIFAR-10"])
def test_missing_data_gives_a_one_line_error(name, tmp_path, monkeypatch):
    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    data = make(name, tmp_path / "empty", download=False, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetMissingError) as error:
        data.prepare_data()  # GTSRB decodes its cache here, MNIST has nothing to do
        data.setup()
    message = str(error.value)
    assert "\n" not in message and name in message and str(tmp_path / "empty") in message
    assert "AUROR_DATA_DIR" in message


@pytest.mark.parametrize("name", ["MNIST", "Fashion-MNIST", "GTSRB", "CIFAR-10"])
def test_failed_download_gives_the_same_error(name, tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise urllib.error.URLError("simulated: no network")

    monkeypatch.delenv("AUROR_DATA_DIR", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    data = make(name, tmp_path, download=True, cache_dir=tmp_path / "cache")
    with pytest.raises(DatasetMissingError, match="could not be downloaded") as error:
        data.prepare_data()
    assert "\n" not in str(error.value) and name in str(error.value) and str(tmp_path) in str(error.value)


# --- CNN -----------------------------------------------------------------------------------------------------------

def test_cnn_output_shape_for_images_and_flat_inputs():
    torch.manual_seed(0)
    cnn = CNNClassifier(43)
    assert cnn(torch.randn(5, 3, 32, 32)).shape == (5, 43)
    assert cnn(torch.randn(5, 3 * 32 * 32)).shape == (5, 43)
    assert CNNClassifier(10, input_shape=(1, 28, 28))(torch.randn(2, 784)).shape == (2, 10)


def test_cnn_trains_through_vectorised_training_like_each_user_alone():
    torch.manual_seed(0)
    module = CNNClassifier(43, channels=(4, 8), hidden_size=16, lr=0.1)
    x, y = torch.randn(60, 3, 32, 32), torch.randint(0, 43, (60,))
    user_indices = [torch.arange(u * 20, (u + 1) * 20) for u in range(3)]
    schedule = user_batches(user_indices, [1, 1, 1], 8, seed=0, round_=0)  # 3 steps, the last one short
    multipliers = torch.tensor([1.0, 2.0, 0.5])
    global_params = parameters_to_vector(module.parameters()).detach().clone()
    together = train_users(module, global_params, x, y, schedule, multipliers)

    for user in range(3):
        alone = copy.deepcopy(module)
        vector_to_parameters(global_params.clone(), alone.parameters())
        optimizer = alone.make_optimizer(alone.parameters(), lr_multiplier=float(multipliers[user]))
        for batch in schedule[:, user]:
            batch = batch[batch >= 0]
            optimizer.zero_grad()
            alone.loss(alone(x[batch]), y[batch]).backward()
            optimizer.step()
        expected = parameters_to_vector(alone.parameters()).detach()
        torch.testing.assert_close(together[user], expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(expected, global_params)


# --- the full data (slow) ------------------------------------------------------------------------------------------

@pytest.mark.manual
def test_full_gtsrb_decodes_once_and_loads_from_cache(gtsrb_root, tmp_path, monkeypatch):
    data = GTSRBDataModule(**USERS, root=gtsrb_root, cache_dir=tmp_path)
    data.prepare_data()
    monkeypatch.setattr(gtsrb, "decode_images", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    data.setup()
    assert data.train_x.shape == (39209, 3, 32, 32) and data.test_x.shape == (12630, 3, 32, 32)
    assert set(data.clean_train_y.unique().tolist()) == set(range(43)) == set(data.test_y.unique().tolist())
