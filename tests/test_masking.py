import math

import pytest
import torch

from pipeline.core.masking import (
    add_laplace_noise,
    aggregate_per_coordinate,
    clip,
    download_merge,
    laplace_scale,
    mask_updates,
    num_kept,
    upload_mask,
)

nan = math.nan


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_num_kept():
    assert num_kept(1.0, 7) == 7
    assert num_kept(0.1, 100) == 10
    assert num_kept(0.01, 10) == 1  # at least one value
    with pytest.raises(ValueError):
        num_kept(0.0, 10)


def test_largest_mode_keeps_the_largest_magnitudes_ties_to_lower_index():
    updates = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 1.0, 1.0, -1.0]])
    mask = upload_mask(updates, 0.5, "largest", gen())
    assert mask.tolist() == [[False, True, True, False], [True, True, False, False]]


@pytest.mark.parametrize("mode", ["largest", "random"])
@pytest.mark.parametrize("fraction, kept", [(0.1, 10), (0.25, 25), (0.001, 1), (1.0, 100)])
def test_upload_keeps_exactly_the_fraction_per_user(mode, fraction, kept):
    updates = torch.randn(6, 100, generator=gen())
    mask = upload_mask(updates, fraction, mode, gen(1))
    assert mask.dtype == torch.bool and mask.shape == (6, 100)
    assert (mask.sum(1) == kept).all()
    if mode == "largest" and kept < 100:  # every kept |value| >= every dropped one, per user
        for row, keep in zip(updates.abs(), mask):
            assert row[keep].min() >= row[~keep].max()


def test_random_mode_is_reproducible_and_depends_on_the_generator():
    updates = torch.randn(4, 50, generator=gen())
    a, b = upload_mask(updates, 0.2, "random", gen(7)), upload_mask(updates, 0.2, "random", gen(7))
    c = upload_mask(updates, 0.2, "random", gen(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # users draw independently


def test_unknown_mode_raises():
    with pytest.raises(ValueError):
        upload_mask(torch.zeros(2, 4), 0.5, "smallest", gen())


def test_clip():
    x = torch.tensor([[-5.0, -0.5, 0.0, 0.5, 5.0]])
    assert clip(x, 1.0).tolist() == [[-1.0, -0.5, 0.0, 0.5, 1.0]]
    assert clip(x, math.inf) is x


def test_laplace_scale_formula():
    assert laplace_scale(0.01, 1.0, 10) == pytest.approx(2 * 0.01 * 10 / 1.0)
    assert laplace_scale(0.5, 4.0, 3) == pytest.approx(0.75)
    assert laplace_scale(0.5, math.inf, 3) == 0.0
    assert laplace_scale(math.inf, math.inf, 3) == 0.0
    with pytest.raises(ValueError):
        laplace_scale(math.inf, 1.0, 3)


def test_laplace_noise_has_the_documented_scale():
    b = laplace_scale(0.05, 2.0, 10)  # 0.5
    values = torch.full((400, 500), 3.0)  # 200k draws
    noise = (add_laplace_noise(values, b, gen(0)) - values).double()
    assert torch.isfinite(noise).all()
    assert noise.abs().mean().item() == pytest.approx(b, rel=0.02)  # E|X| = b for Laplace(0, b)
    assert abs(noise.mean().item()) < 0.02 * b
    assert noise.var().item() == pytest.approx(2 * b**2, rel=0.05)


def test_laplace_noise_is_reproducible_and_infinite_epsilon_adds_nothing():
    values = torch.randn(3, 20, generator=gen())
    a, b = add_laplace_noise(values, 0.3, gen(5)), add_laplace_noise(values, 0.3, gen(5))
    assert torch.equal(a, b) and not torch.equal(a, add_laplace_noise(values, 0.3, gen(6)))
    assert a.dtype == values.dtype
    untouched = add_laplace_noise(values, laplace_scale(0.1, math.inf, 20), gen(5))
    assert torch.equal(untouched, values)


def test_mask_updates_puts_nan_where_nothing_was_uploaded():
    updates = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    mask = torch.tensor([[True, False], [False, True]])
    masked = mask_updates(updates, mask)
    assert torch.equal(torch.isnan(masked), ~mask)
    assert masked[0, 0] == 1.0 and masked[1, 1] == 0.0


def test_per_coordinate_aggregation_on_hand_made_uploads():
    masked = torch.tensor([
        [1.0, nan, 4.0, nan, 100.0],
        [3.0, 2.0, nan, nan, nan],
        [nan, 6.0, nan, nan, nan],
        [-50.0, -50.0, -50.0, 9.0, -50.0],  # not accepted
    ])
    accepted = torch.tensor([True, True, True, False])
    result = aggregate_per_coordinate(masked, accepted)
    # coordinate 3: only the rejected user uploaded it -> 0
    assert result.tolist() == [2.0, 4.0, 4.0, 0.0, 100.0]
    assert torch.equal(aggregate_per_coordinate(masked, torch.zeros(4, dtype=torch.bool)), torch.zeros(5))


def plain_fedavg(updates, accepted):
    """Federated averaging as usually written: the mean of the accepted updates."""
    return updates[accepted].mean(0) if accepted.any() else torch.zeros(updates.shape[1], dtype=updates.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("users, params", [(1, 1), (3, 7), (8, 33), (17, 1000), (30, 4097), (64, 20000)])
def test_fedavg_special_case_equals_the_plain_mean_bit_for_bit(users, params, dtype):
    g = gen(users * params)
    for _ in range(3):
        updates = torch.randn(users, params, generator=g, dtype=dtype) * torch.rand(users, 1, generator=g, dtype=dtype)
        accepted = torch.rand(users, generator=g) < 0.7
        full = upload_mask(updates, 1.0, "largest", g)
        sent = mask_updates(add_laplace_noise(clip(updates, math.inf), 0.0, g), full)
        assert torch.equal(aggregate_per_coordinate(sent, accepted), plain_fedavg(updates, accepted))
    nobody = torch.zeros(users, dtype=torch.bool)
    assert torch.equal(aggregate_per_coordinate(updates, nobody), plain_fedavg(updates, nobody))


def test_download_everything_gives_the_global_params_bit_for_bit():
    global_params = torch.randn(50, generator=gen(0))
    local = torch.randn(4, 50, generator=gen(1))
    merged = download_merge(global_params, local, 1.0, gen(2))
    assert merged.shape == (4, 50)
    assert all(torch.equal(row, global_params) for row in merged)
    merged[0, 0] = 123.0  # a copy, not a view of global_params
    assert global_params[0] != 123.0


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.37, 0.9])
def test_download_replaces_exactly_round_fraction_coordinates_per_user(fraction):
    global_params = torch.zeros(200)
    local = torch.arange(1, 5 * 200 + 1, dtype=torch.float32).reshape(5, 200)  # never 0
    merged = download_merge(global_params, local, fraction, gen(3))
    replaced = merged == 0
    assert (replaced.sum(1) == round(fraction * 200)).all()
    assert torch.equal(merged[~replaced], local[~replaced])
    again = download_merge(global_params, local, fraction, gen(3))
    assert torch.equal(merged, again)


def test_per_coordinate_aggregation_matches_a_naive_loop_on_random_masks():
    g = gen(11)
    updates = torch.randn(9, 40, generator=g, dtype=torch.float64)
    masked = mask_updates(updates, upload_mask(updates, 0.3, "random", g))
    accepted = torch.rand(9, generator=g) < 0.6
    result = aggregate_per_coordinate(masked, accepted)
    for j in range(40):
        values = [masked[u, j] for u in range(9) if accepted[u] and not torch.isnan(masked[u, j])]
        expected = sum(values) / len(values) if values else 0.0
        assert result[j].item() == pytest.approx(float(expected), abs=1e-12)


def test_present_and_complete_rows_value_by_value():
    """Rows judged by their sums first: a row with +inf and -inf (sum NaN, no NaN value) is still complete."""
    from pipeline.core.server import complete_rows, present_rows

    nan, inf = float("nan"), float("inf")
    updates = torch.tensor([[1.0, 2.0, 3.0], [nan, 2.0, 3.0], [nan, nan, nan], [inf, -inf, 0.0], [inf, nan, 1.0]])
    assert present_rows(updates).tolist() == [True, True, False, True, True]
    assert complete_rows(updates).tolist() == [True, False, False, True, False]
    assert torch.equal(present_rows(updates), ~torch.isnan(updates).all(1))
    assert torch.equal(complete_rows(updates), ~torch.isnan(updates).any(1))
    assert present_rows(torch.zeros(3, 0)).tolist() == [False] * 3  # no coordinate: nothing uploaded
