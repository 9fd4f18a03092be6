import inspect

import pytest
import torch

from lightning_modules.base import LocalModel
from lightning_modules.cnn import CNNClassifier
from lightning_modules.lenet import LeNet5Classifier
from lightning_modules.mlp import MLPClassifier
from lightning_modules.resnet import ResNet8Classifier


def models():
    torch.manual_seed(0)
    return [MLPClassifier(64, 10, hidden_sizes=[32, 16], lr=0.1),
            CNNClassifier(10, input_shape=(1, 28, 28), channels=(4, 8), hidden_size=16, lr=0.05),
            LeNet5Classifier(10), ResNet8Classifier(10, widths=(4, 8, 8), groups=2)]


@pytest.mark.parametrize("model", models(), ids=["mlp", "cnn", "lenet5", "resnet8"])
def test_models_satisfy_the_local_training_contract(model):
    assert isinstance(model, LocalModel)
    assert isinstance(model.net, torch.nn.Sequential)
    # what isinstance checks on Python >= 3.12 (inspect.getattr_static does not see nn.Module's _modules)
    assert inspect.getattr_static(model, "net") is not None


@pytest.mark.parametrize("model", models(), ids=["mlp", "cnn", "lenet5", "resnet8"])
def test_loss_without_reduction_has_one_value_per_sample(model):
    logits, y = torch.randn(7, 10), torch.randint(0, 10, (7,))
    per_sample = model.loss(logits, y, reduction="none")
    assert per_sample.shape == (7,)
    torch.testing.assert_close(per_sample.mean(), model.loss(logits, y))


@pytest.mark.parametrize("model", models(), ids=["mlp", "cnn", "lenet5", "resnet8"])
def test_make_optimizer_scales_the_learning_rate(model):
    optimizer = model.make_optimizer(model.parameters(), 2.0)
    assert type(optimizer) is torch.optim.SGD
    assert [group["lr"] for group in optimizer.param_groups] == [2 * model.hparams.lr]
    assert model.configure_optimizers().param_groups[0]["lr"] == model.hparams.lr


def test_mlp_forward_flattens_its_input():
    torch.manual_seed(0)
    mlp = MLPClassifier(64, 10)
    assert mlp(torch.randn(5, 64)).shape == (5, 10)
    assert mlp(torch.randn(5, 1, 8, 8)).shape == (5, 10)


def test_cnn_forward_takes_images_and_flat_inputs():
    torch.manual_seed(0)
    cnn = CNNClassifier(43)
    assert cnn(torch.randn(5, 3, 32, 32)).shape == (5, 43)
    assert cnn(torch.randn(5, 3 * 32 * 32)).shape == (5, 43)
    assert CNNClassifier(10, input_shape=(1, 28, 28))(torch.randn(2, 784)).shape == (2, 10)


def test_lenet5_and_resnet8_have_the_documented_sizes_and_no_buffers():
    """No BatchNorm running statistics: every tensor a user changes is a parameter it uploads."""
    for model, size, shape in [(LeNet5Classifier(10), 61_706, (1, 28, 28)), (ResNet8Classifier(10), 78_042, (3, 32, 32))]:
        assert sum(p.numel() for p in model.parameters()) == size and not list(model.buffers())
        assert model(torch.zeros(2, *shape)).shape == (2, 10) == model(torch.zeros(2, int(torch.tensor(shape).prod()))).shape
    norms = [m for m in ResNet8Classifier(10).modules() if isinstance(m, torch.nn.GroupNorm)]
    assert len(norms) == 9 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in ResNet8Classifier(10).modules())
