"""``training.device``: where the model, the data and the server's tensors live.

Where PyTorch sees no GPU the CUDA tests skip. The client side's device
handling is then still checked on PyTorch's ``meta`` device (tensors without
values): an operation that mixes a meta tensor with a CPU one raises, as one
mixing CUDA and CPU tensors would.
"""

import pytest
import torch
from torch.nn.utils import parameters_to_vector

from pipeline.defenses.auror import Auror
from pipeline.core.checkpoint import Checkpoint
from pipeline.experiment.config import ConfigError, FaultsConfig, ProtocolConfig, load_config
from pipeline.experiment.arms import build_datamodule, build_model, make_attack, run_arm, user_behaviour
from pipeline.core.faults import inject_faults
from pipeline.core.local_training import train_users, user_batches
from pipeline.core.device import describe_device, seeded_generator, select_device
from pipeline.core.loop import CollaborativeLoop, upload
from pipeline.core.masking import download_merge
from pipeline.experiment.tracking import run_tags
from tests.conftest import TINY

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; PyTorch sees none here")
FAULTS = FaultsConfig(nan_users=[0], inf_users=[1], dropout_users=[2], huge_users=[3])
DSSGD = ProtocolConfig(theta_d=0.5, theta_u=0.1, upload_selection="random", gamma=0.01, epsilon=100.0)


def test_auto_is_the_gpu_when_pytorch_sees_one_else_the_cpu():
    assert select_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_device("cpu") == torch.device("cpu")
    assert describe_device(torch.device("cpu")) == f"cpu ({torch.get_num_threads()} threads)"


def test_run_tags_name_the_device():
    cfg = load_config(None, TINY)
    assert run_tags(cfg, "auror")["device"] == describe_device(torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_missing_gpu_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"^training.device: .cuda. asked for, but PyTorch sees no CUDA GPU"):
        select_device("cuda")


def test_a_gpu_index_beyond_the_gpus_or_an_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^--device: 'cuda:99' asked for"):
        select_device("cuda:99", key="--device")
    with pytest.raises(ConfigError, match=r"^training.device: must be auto, cpu, cuda or cuda:N, got 'gpu'"):
        load_config(None, ["training.device=gpu"])


def test_the_client_side_keeps_every_tensor_on_the_device_of_its_input():
    """Download, local training, upload (mask, clip, noise) and faults, on the meta
    device: random draws come from CPU generators and must be moved."""
    cfg = load_config(None, TINY)
    data = build_datamodule(cfg, poison=True)
    behaviour = user_behaviour(cfg, make_attack(cfg), data.malicious, attacking=True)
    meta = torch.device("meta")
    module = build_model(cfg, data).to(meta)
    global_params = parameters_to_vector(module.parameters()).detach()
    num_users = len(data.user_indices)
    local_params = global_params.expand(num_users, -1).clone()
    schedule = user_batches(data.user_indices, behaviour.epochs, cfg.training.batch_size, cfg.seed, 1)

    start = download_merge(global_params, local_params, DSSGD.theta_d, seeded_generator(0, 1))
    trained = train_users(module, start, data.train_x.to(meta), data.train_y.to(meta), schedule,
                          behaviour.lr_multipliers)
    sent = upload(trained - start, DSSGD, seeded_generator(0, 1))
    largest = upload(trained - start, ProtocolConfig(theta_u=0.1), seeded_generator(0, 1))
    faulty = inject_faults(sent, FAULTS, 1, seeded_generator(0, 2))
    for out in (start, trained, sent, largest, faulty):
        assert out.device == meta and out.shape == (num_users, global_params.numel())


@requires_cuda
def test_cuda_draws_the_same_masks_and_faults_as_the_cpu():
    updates = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    on_cpu = inject_faults(upload(updates, DSSGD, seeded_generator(0, 1)), FAULTS, 1, seeded_generator(0, 2))
    on_gpu = inject_faults(upload(updates.cuda(), DSSGD, seeded_generator(0, 1)), FAULTS, 1, seeded_generator(0, 2))
    assert on_gpu.device.type == "cuda"
    assert torch.equal(torch.isnan(on_gpu).cpu(), torch.isnan(on_cpu))
    assert torch.equal(torch.isinf(on_gpu).cpu(), torch.isinf(on_cpu))
    kept = torch.isfinite(on_cpu)
    torch.testing.assert_close(on_gpu.cpu()[kept], on_cpu[kept])
    local = torch.zeros(5, 1000)
    merged = download_merge(torch.ones(1000), local, 0.5, seeded_generator(0, 3))
    assert torch.equal(download_merge(torch.ones(1000).cuda(), local.cuda(), 0.5, seeded_generator(0, 3)).cpu(), merged)


@requires_cuda
def test_auror_on_cuda_updates_flags_the_same_users_as_on_the_cpu():
    g = torch.Generator().manual_seed(0)
    updates = torch.randn(10, 5000, generator=g) * 0.01
    updates[:3, :500] += 0.05  # three users pull 500 features the same way
    updates[torch.rand(updates.shape, generator=g) < 0.3] = float("nan")
    on_cpu, on_gpu = Auror(alpha=0.04).fit(updates), Auror(alpha=0.04).fit(updates.cuda())
    assert on_gpu.flagged_.tolist() == on_cpu.flagged_.tolist() and on_cpu.flagged_[:3].all()
    assert (on_gpu.indicative_ == on_cpu.indicative_).all()


@requires_cuda
def test_a_cuda_run_repeats_exactly_and_agrees_with_the_cpu():
    cfg_cpu = load_config(None, [*TINY, "users.num_users=10", "training.rounds=10", "defense.auror.window_rounds=3"])
    cfg_gpu = load_config(None, [*TINY, "users.num_users=10", "training.rounds=10", "defense.auror.window_rounds=3",
                                 "training.device=cuda"])
    cpu, gpu, again = run_arm(cfg_cpu, "auror"), run_arm(cfg_gpu, "auror"), run_arm(cfg_gpu, "auror")
    assert gpu.metrics == again.metrics and gpu.history == again.history  # deterministic kernels
    assert gpu.detection["flagged_users"] == cpu.detection["flagged_users"]
    assert abs(gpu.metrics["accuracy"] - cpu.metrics["accuracy"]) < 0.03
    assert all(p.device.type == "cpu" for p in gpu.module.parameters())  # returned for logging on the CPU


@requires_cuda
def test_a_run_checkpointed_on_cuda_resumes_on_the_cpu(tmp_path):
    cfg = load_config(None, [*TINY, "protocol.theta_d=0.5"])  # users keep local parameters across rounds
    checkpoint = Checkpoint(tmp_path / "arm.pt", "test")

    def loop(rounds: int, device: str) -> CollaborativeLoop:
        data = build_datamodule(cfg, poison=True)
        torch.manual_seed(cfg.seed)
        return CollaborativeLoop(build_model(cfg, data), data, user_behaviour(cfg, make_attack(cfg), data.malicious, True), rounds,
                                 cfg.training.batch_size, cfg.seed, make_attack(cfg), cfg.protocol, checkpoint=checkpoint,
                                 device=torch.device(device))

    loop(2, "cuda").run()
    resumed = loop(4, "cpu")
    resumed.run()
    assert [h["round"] for h in resumed.history] == [1, 2, 3, 4]
    assert all(p.device.type == "cpu" for p in resumed.module.parameters())



PAGE_FAULTS = """
import resource, sys, torch
sys.path.insert(0, "benchmarks")
import pipeline.core.device as device
from bench_cross_device import make_case
if sys.argv[1] == "default":
    device._allocator_kept = False  # as if applied already: glibc's defaults stay
x, y = torch.rand(1200, 784), torch.randint(0, 10, (1200,))
run = make_case(x, y, 200, 6, 2, 0)  # 2 rounds of 100 users sampled out of 200, the MNIST MLP
run()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.slow
@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_the_loop_reuses_freed_memory_instead_of_faulting_pages_in_every_round():
    """A round allocates and frees (100 users, 109,386) tensors, 44 MB each: with glibc's defaults every one
    is a fresh mmap whose pages fault in again (tens of thousands a round); the loop calls
    keep_freed_memory, and a second run's rounds then fault a small fraction of that (5 to 2,455 over runs here,
    from other allocations, against about 62,000)."""
    import subprocess
    import sys

    def faults(mode):
        done = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    default = faults("default")
    assert default > 20_000
    assert faults("kept") < default / 10
