import copy

import pytorch_lightning as pl
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.digits import DigitsDataModule
from lightning_modules.mlp import MLPClassifier
from pipeline.core.local_training import CPU_USERS_PER_PASS, grouped_layers, train_users, user_batches


def small_setup():
    data = DigitsDataModule(num_users=4, malicious_fraction=0.25, seed=0)
    data.setup()
    torch.manual_seed(0)
    module = MLPClassifier(64, 10, hidden_sizes=[32, 16], lr=0.1)
    return data, module


def test_vectorised_training_equals_training_each_user_alone():
    data, module = small_setup()
    global_params = parameters_to_vector(module.parameters()).detach().clone()
    epochs, multipliers = [1, 3, 1, 2], torch.tensor([1.0, 2.5, 1.0, 0.5])
    schedule = user_batches(data.user_indices, epochs, 16, seed=0, round_=1)
    together = train_users(module, global_params, data.train_x, data.train_y, schedule, multipliers)

    for user in range(4):
        alone = copy.deepcopy(module)
        vector_to_parameters(global_params.clone(), alone.parameters())  # it aliases the vector
        optimizer = alone.make_optimizer(alone.parameters(), lr_multiplier=float(multipliers[user]))
        for batch in schedule[:, user]:
            batch = batch[batch >= 0]
            if len(batch) == 0:
                continue
            optimizer.zero_grad()
            alone.loss(alone(data.train_x[batch]), data.train_y[batch]).backward()
            optimizer.step()
        expected = parameters_to_vector(alone.parameters()).detach()
        torch.testing.assert_close(together[user], expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, global_params)


def test_schedule_gives_each_user_its_own_epochs_of_its_own_samples():
    data, _ = small_setup()
    schedule = user_batches(data.user_indices, [1, 3, 1, 2], 16, seed=0, round_=1)
    for user, n_epochs in enumerate([1, 3, 1, 2]):
        seen = schedule[:, user][schedule[:, user] >= 0]
        own = data.user_indices[user]
        assert len(seen) == n_epochs * len(own)
        assert torch.equal(seen.unique(), own.unique())
    assert torch.equal(schedule, user_batches(data.user_indices, [1, 3, 1, 2], 16, seed=0, round_=1))


def test_the_module_also_fits_with_a_plain_lightning_trainer():
    data, module = small_setup()
    before = parameters_to_vector(module.parameters()).detach().clone()
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data.user_dataloader(0, batch_size=16))
    assert not torch.allclose(parameters_to_vector(module.parameters()), before)


def train_each_alone(module, global_params, x, y, schedule, multipliers):
    """Reference: every user trained by itself with the module's optimiser, one plain loop per user."""
    expected = []
    for user in range(schedule.shape[1]):
        alone = copy.deepcopy(module)
        vector_to_parameters(global_params.clone(), alone.parameters())
        optimizer = alone.make_optimizer(alone.parameters(), lr_multiplier=float(multipliers[user]))
        for batch in schedule[:, user]:
            batch = batch[batch >= 0]
            if len(batch):
                optimizer.zero_grad()
                alone.loss(alone(x[batch]), y[batch]).backward()
                optimizer.step()
        expected.append(parameters_to_vector(alone.parameters()).detach())
    return torch.stack(expected)


class MomentumMLP(MLPClassifier):
    """Not plain SGD: trained through autograd and the optimiser's own step."""

    def make_optimizer(self, params, lr_multiplier: float = 1.0):
        return torch.optim.SGD(params, lr=self.hparams.lr * lr_multiplier, momentum=0.9)


class OtherNet(torch.nn.Module):
    """Linear layers with and without bias, ReLU, GELU, Identity: the written-out backward pass."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Identity(), torch.nn.Linear(64, 24, bias=False), torch.nn.ReLU(), torch.nn.Linear(24, 12),
            torch.nn.GELU(), torch.nn.Linear(12, 10),
        )

    def forward(self, x):
        return self.net(x.flatten(1))

    loss = staticmethod(MLPClassifier.loss)

    def make_optimizer(self, params, lr_multiplier: float = 1.0):
        return torch.optim.SGD(params, lr=0.2 * lr_multiplier)


class TinyConvNet(torch.nn.Module):
    """Convolutions without ``shape_input``: one functional_call per user."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(36, 10),
        )

    def forward(self, x):
        return self.net(x.reshape(-1, 1, 8, 8))

    loss = staticmethod(MLPClassifier.loss)

    def make_optimizer(self, params, lr_multiplier: float = 1.0):
        return torch.optim.SGD(params, lr=0.2 * lr_multiplier)


def test_other_layers_and_other_optimisers_equal_training_each_user_alone():
    data, _ = small_setup()
    multipliers = torch.tensor([1.0, 2.5, 1.0, 0.5])
    # unequal epochs: users finish at different steps (a momentum step must not move them after)
    schedule = user_batches(data.user_indices, [2, 1, 3, 1], 16, seed=0, round_=2)
    torch.manual_seed(1)
    for module in (MomentumMLP(64, 10, hidden_sizes=[32, 16], lr=0.05), OtherNet(), TinyConvNet()):
        global_params = parameters_to_vector(module.parameters()).detach().clone()
        together = train_users(module, global_params, data.train_x, data.train_y, schedule, multipliers)
        expected = train_each_alone(module, global_params, data.train_x, data.train_y, schedule, multipliers)
        torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(together, global_params.expand_as(together))


def test_lenet5_and_resnet8_users_equal_training_each_user_alone():
    from lightning_modules.lenet import LeNet5Classifier
    from lightning_modules.resnet import ResNet8Classifier

    g = torch.Generator().manual_seed(0)
    for module, shape in [(LeNet5Classifier(10, lr=0.05), (1, 28, 28)),
                          (ResNet8Classifier(10, widths=(4, 8, 8), groups=2, lr=0.05), (3, 32, 32))]:
        x, y = torch.randn(48, *shape, generator=g), torch.randint(0, 10, (48,), generator=g)
        schedule = user_batches([torch.arange(i * 16, (i + 1) * 16) for i in range(3)], [1, 2, 1], 8, seed=0, round_=1)
        multipliers = torch.tensor([1.0, 2.0, 0.5])
        global_params = parameters_to_vector(module.parameters()).detach().clone()
        together = train_users(module, global_params, x, y, schedule, multipliers)
        expected = train_each_alone(module, global_params, x, y, schedule, multipliers)
        torch.testing.assert_close(together, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(together, global_params.expand_as(together))


def test_one_start_per_user():
    data, module = small_setup()
    multipliers = torch.ones(4)
    schedule = user_batches(data.user_indices, [1, 1, 1, 1], 16, seed=0, round_=3)
    base = parameters_to_vector(module.parameters()).detach()
    starts = base + 0.05 * torch.randn(4, base.numel(), generator=torch.Generator().manual_seed(0))
    together = train_users(module, starts, data.train_x, data.train_y, schedule, multipliers)
    for user in range(4):
        alone = train_users(module, starts[user], data.train_x, data.train_y, schedule, multipliers)
        torch.testing.assert_close(together[user], alone[user], rtol=1e-5, atol=1e-6)


class Opaque(torch.nn.Module):
    """A block that does not declare ``channelwise``: its forward could mix channels."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.conv(x).flip(1)


class GroupedConvNet(torch.nn.Module):
    """Every layer the grouped pass stacks: padded and depthwise convolutions with and without bias,
    GroupNorm, average and max pooling, a residual-style channelwise block, then Linear and Tanh."""

    class Block(torch.nn.Module):
        channelwise = True

        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False),
                                            torch.nn.GroupNorm(2, 4))

        def forward(self, x):
            return torch.relu(self.body(x) + x)

    def __init__(self, middle=None):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU(),
            middle or self.Block(), torch.nn.AvgPool2d(2), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
            torch.nn.Linear(16, 12), torch.nn.Tanh(), torch.nn.Linear(12, 10),
        )

    def shape_input(self, x):
        return x.reshape(-1, 1, 8, 8)

    def forward(self, x):
        return self.net(self.shape_input(x))

    loss = staticmethod(MLPClassifier.loss)

    def make_optimizer(self, params, lr_multiplier: float = 1.0):
        return torch.optim.SGD(params, lr=0.2 * lr_multiplier, momentum=0.5)


def test_the_grouped_pass_takes_the_shipped_convolutional_models_and_nothing_it_cannot_stack():
    from lightning_modules.cnn import CNNClassifier
    from lightning_modules.lenet import LeNet5Classifier
    from lightning_modules.resnet import ResNet8Classifier

    for module in (LeNet5Classifier(10), CNNClassifier(43), ResNet8Classifier(10), GroupedConvNet()):
        assert grouped_layers(module, 3) is not None, type(module).__name__
    # no convolution (the MLP: its own path), no shape_input, a block that may mix channels, dropout
    for module in (MLPClassifier(64, 10), TinyConvNet(), GroupedConvNet(Opaque()),
                   GroupedConvNet(torch.nn.Dropout(0.5))):
        assert grouped_layers(module, 3) is None


def test_grouped_convolutions_equal_training_each_user_alone():
    """In float64, so that only float reordering separates the paths; more users than one CPU pass holds."""
    data, _ = small_setup()
    users = CPU_USERS_PER_PASS + 2
    indices = [data.user_indices[u % 4][: 24 + 4 * u] for u in range(users)]  # unequal sizes
    epochs = [1 + u % 3 for u in range(users)]
    multipliers = torch.linspace(0.5, 2.0, users, dtype=torch.float64)
    schedule = user_batches(indices, epochs, 8, seed=0, round_=1)
    x, y = data.train_x.double(), data.train_y
    torch.manual_seed(2)
    module = GroupedConvNet().double()
    global_params = parameters_to_vector(module.parameters()).detach().clone()
    together = train_users(module, global_params, x, y, schedule, multipliers)
    expected = train_each_alone(module, global_params, x, y, schedule, multipliers)
    torch.testing.assert_close(together, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(together, global_params.expand_as(together))
    opaque = GroupedConvNet(Opaque()).double()  # the per-user path, the same contract
    start = parameters_to_vector(opaque.parameters()).detach().clone()
    torch.testing.assert_close(train_users(opaque, start, x, y, schedule, multipliers),
                               train_each_alone(opaque, start, x, y, schedule, multipliers), rtol=1e-10, atol=1e-12)
