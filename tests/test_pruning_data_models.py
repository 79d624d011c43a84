"""Pruning layer: dataset reading, the model zoo, training determinism and resumption."""
from pathlib import Path

import pytest
import torch
import torch.fx as fx

from pruning.data import DATA_ENV, dataset_info, load_dataset, resolve_data_dir
from pruning.errors import PruningError
from pruning.models import MODELS, build_model, mlp
from pruning.objectives import AttackConfig, PGDTraining, Standard, pgd_attack
from pruning.train import TrainConfig, train

DATA = Path(__file__).parent / "data" / "pruning"
INFO = dataset_info("fashion-mnist")


def test_idx_slice_loads_with_known_labels_and_pixel_range():
    train_data = load_dataset("fashion-mnist", DATA, "train")
    test_data = load_dataset("fashion-mnist", DATA, "test")
    assert train_data.images.shape == (400, 1, 28, 28)
    assert test_data.images.shape == (100, 1, 28, 28)
    assert test_data.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert 0.0 <= float(train_data.images.min()) and float(train_data.images.max()) <= 1.0
    assert train_data.images.dtype == torch.float32 and train_data.labels.dtype == torch.int64


def test_uncompressed_idx_and_cifar_batches_load(tmp_path):
    import gzip
    import pickle

    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(DATA / "FashionMNIST" / "raw" / f"{name}.gz") as handle:
            (raw / name).write_bytes(handle.read())
    mnist = load_dataset("mnist", tmp_path, "test")
    assert mnist.images.shape == (100, 1, 28, 28) and mnist.labels[0] == 9

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                 "data_batch_5", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                 b"labels": [1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    cifar = load_dataset("cifar10", tmp_path, "train")
    assert cifar.images.shape == (15, 3, 32, 32) and cifar.labels.tolist() == [1, 2, 3] * 5
    first = batch[b"data"][0].reshape(3, 32, 32) / 255.0
    test = load_dataset("cifar10", tmp_path, "test")
    assert np.allclose(test.images[0].numpy(), first)


def test_missing_dataset_names_the_expected_file(tmp_path):
    with pytest.raises(PruningError, match=r"MNIST/raw/train-images-idx3-ubyte\[\.gz\]"):
        load_dataset("mnist", tmp_path, "train")
    with pytest.raises(PruningError, match=r"cifar-10-batches-py/data_batch_1"):
        load_dataset("cifar10", tmp_path, "train")
    with pytest.raises(PruningError, match="unknown dataset"):
        load_dataset("svhn", tmp_path, "train")


def test_data_root_comes_from_flag_then_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(PruningError, match="--data-dir"):
        resolve_data_dir(None)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("dataset", ["fashion-mnist", "cifar10"])
def test_zoo_models_run_and_trace_on_both_input_shapes(name, dataset):
    info = dataset_info(dataset)
    model = build_model(name, info).eval()
    x = torch.rand(2, *info.input_shape)
    traced = fx.symbolic_trace(model)
    assert model(x).shape == (2, 10)
    assert torch.equal(traced(x), model(x))


def test_oval21_base_shape_on_cifar():
    model = build_model("cnn_base", dataset_info("cifar10"))
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.endswith("weight")]
    assert shapes == [(8, 3, 4, 4), (16, 8, 4, 4), (100, 1024), (10, 100)]


def test_unknown_model_is_a_pruning_error():
    with pytest.raises(PruningError, match="unknown model 'resnet'"):
        build_model("resnet", INFO)


def _tiny_run(checkpoint=None, stop_after_steps=None):
    """2 epochs of PGD training, 4 steps each; optionally interrupted after some steps."""
    data = load_dataset("fashion-mnist", DATA, "train").head(256)
    torch.manual_seed(0)
    model = mlp(INFO, (16,))
    steps = []

    def count_and_stop():
        steps.append(1)
        if len(steps) == stop_after_steps:
            raise KeyboardInterrupt

    objective = PGDTraining(AttackConfig(eps=0.1, steps=2))
    config = TrainConfig(epochs=2, batch_size=64, seed=3)
    try:
        train(model, objective, data, config, checkpoint=checkpoint, after_step=count_and_stop,
              progress=False)
    except KeyboardInterrupt:
        pass
    return model


def test_training_is_deterministic_on_cpu():
    first, second = _tiny_run(), _tiny_run()
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    straight = _tiny_run()
    _tiny_run(checkpoint=tmp_path / "ckpt.pt", stop_after_steps=6)  # mid-way through epoch 2
    assert (tmp_path / "ckpt.pt").is_file()
    resumed = _tiny_run(checkpoint=tmp_path / "ckpt.pt")
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_resuming_from_a_checkpoint_of_another_model_is_a_pruning_error(tmp_path):
    _tiny_run(checkpoint=tmp_path / "ckpt.pt", stop_after_steps=6)
    data = load_dataset("fashion-mnist", DATA, "train").head(64)
    with pytest.raises(PruningError, match="cannot resume from .*ckpt.pt"):
        train(mlp(INFO, (8,)), Standard(), data, TrainConfig(epochs=2),
              checkpoint=tmp_path / "ckpt.pt", progress=False)


def test_pgd_stays_in_clipped_ball_and_raises_loss():
    data = load_dataset("fashion-mnist", DATA, "test").head(32)
    torch.manual_seed(0)
    model = mlp(INFO, (32,))
    train(model, Standard(), load_dataset("fashion-mnist", DATA, "train"),
          TrainConfig(epochs=2), progress=False)
    attack = AttackConfig(eps=0.1, steps=10)
    x_adv = pgd_attack(model, data.images, data.labels, attack, torch.Generator().manual_seed(0))
    assert float((x_adv - data.images).abs().max()) <= 0.1 + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(model(x_adv), data.labels) > loss(model(data.images), data.labels)
