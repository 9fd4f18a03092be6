import copy

import pytorch_lightning as pl
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from datamodules.digits import DigitsDataModule
from lightning_modules.mlp import MLPClassifier
from pipeline.local_training import train_users, user_batches


def small_setup():
    data = DigitsDataModule(num_users=4, malicious_fraction=0.25, source_class=1, target_class=7,
                            poisoned_fraction=1.0, poison=True, seed=0)
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
