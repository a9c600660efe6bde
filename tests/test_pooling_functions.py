"""PTG and NSP as pure functions, against the paper authors' reference outputs (tests/data, see SPEC.md)."""

import json

import pytest
import torch
from conftest import GOLDEN
from safetensors import safe_open

from modeling_stgridpool_llava import (
    norm_spatial_pool,
    pyramid_temporal_grid,
    sampled_positions,
    st_grid_pool,
    summary_layout,
)


def load_cases():
    with safe_open(str(GOLDEN), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        return [
            pytest.param(
                params,
                f.get_tensor(f"{name}.input"),
                f.get_tensor(f"{name}.after_ptg"),
                f.get_tensor(f"{name}.expected"),
                id=name,
            )
            for name, params in cases.items()
        ]


def pool_args(params):
    return dict(
        pyramid_levels=params["pyramid_levels"],
        keep_ratio=params["nsp_keep_ratio"],
        temperature=params["nsp_temperature"],
        norm_p=params["nsp_norm_p"],
        padding=params["nsp_padding"],
        partial_windows=params["nsp_partial_windows"],
    )


@pytest.mark.parametrize("params,frames,after_ptg,expected", load_cases())
def test_golden_float32(params, frames, after_ptg, expected):
    before = frames.clone()
    gridded = pyramid_temporal_grid(frames, params["pyramid_levels"])
    pooled = st_grid_pool(frames, **pool_args(params))
    assert torch.equal(frames, before), "the functions must not modify their input"
    assert gridded.dtype == pooled.dtype == torch.float32
    assert (gridded.double() - after_ptg.double()).abs().max() <= 1e-5
    assert pooled.shape == expected.shape
    assert (pooled.double() - expected.double()).abs().max() <= 1e-5


@pytest.mark.parametrize("params,frames,after_ptg,expected", load_cases())
def test_golden_bfloat16(params, frames, after_ptg, expected):
    # bf16 keeps 8 significant bits: unit roundoff u = 2^-9. The input is rounded once, PTG's summaries once more,
    # the output once, and the softmax weights move with the rounded norms; each output is a convex combination of
    # window tokens, so each of those four costs at most ~2u * max|x|. Hence 8u * max|x| = 2^-6 * max|x|.
    pooled = st_grid_pool(frames.bfloat16(), **pool_args(params))
    assert pooled.dtype == torch.bfloat16
    tolerance = 2**-6 * frames.abs().max().item()
    assert (pooled.double() - expected.double()).abs().max().item() <= tolerance


def test_summary_layout_is_the_most_square_factor_pair():
    layouts = {g: summary_layout(g) for g in (1, 2, 3, 4, 6, 7, 8, 9, 12)}
    assert layouts == {
        1: (1, 1),
        2: (2, 1),
        3: (3, 1),
        4: (2, 2),
        6: (3, 2),
        7: (7, 1),
        8: (4, 2),
        9: (3, 3),
        12: (4, 3),
    }


def test_sampled_positions_match_spec_example():
    # SPEC.md: T = 64, level (4, 2) samples frames 1, 3, ..., 63; level (4, 8) samples 7, 15, ..., 63.
    assert sampled_positions(64, 2) == tuple(range(1, 64, 2))
    assert sampled_positions(64, 8) == tuple(range(7, 64, 8))
    assert sampled_positions(3, 4) == ()


def test_ptg_writes_summaries_where_spec_says():
    frames = torch.randn(64, 27, 27, 3)
    out = pyramid_temporal_grid(frames, [(4, 2), (4, 4), (4, 8)])
    changed = {t for t in range(64) if not torch.equal(out[t], frames[t])}
    assert changed == set(range(7, 64, 8))  # (4,2) writes 7, 15, ..., 63; (4,4) and (4,8) write subsets of those
    assert torch.equal(pyramid_temporal_grid(frames[:7], [(4, 2), (4, 4), (4, 8)]), frames[:7])
    assert torch.equal(pyramid_temporal_grid(frames, []), frames)


def test_ptg_summary_tiles_are_area_averages_of_the_chunk():
    frames = torch.randn(8, 27, 27, 2)
    out = pyramid_temporal_grid(frames, [(4, 2)])  # samples 1, 3, 5, 7 -> one summary at 7, 2x2 tiles of 14
    tile = torch.nn.functional.adaptive_avg_pool2d(frames[5].permute(2, 0, 1), (14, 14)).permute(1, 2, 0)
    assert torch.allclose(
        out[7, 14:, :13], tile[:13, :13], atol=1e-6
    )  # frame k=2 -> tile row 1, column 0, cropped to 27


def test_nsp_is_a_norm_softmax_weighted_window_sum():
    frames = torch.randn(2, 4, 4, 5)
    pooled = norm_spatial_pool(frames, keep_ratio=0.25, temperature=2.0, norm_p=3.0)
    window = frames[1, 2:4, 0:2].reshape(4, 5)
    weights = torch.softmax(2.0 * window.norm(p=3, dim=-1) / 5 ** (1 / 3), dim=0)
    assert pooled.shape == (2, 2, 2, 5)
    assert torch.allclose(pooled[1, 1, 0], (weights[:, None] * window).sum(0), atol=1e-6)


def test_nsp_geometry():
    frames = torch.randn(3, 27, 27, 4)
    assert norm_spatial_pool(frames, 0.25).shape == (3, 13, 13, 4)
    assert norm_spatial_pool(frames, 0.25, partial_windows=True).shape == (3, 14, 14, 4)
    assert norm_spatial_pool(frames, 1 / 9, padding=1).shape == (3, 9, 9, 4)
    assert torch.equal(norm_spatial_pool(frames, 1.0), frames)
    # A partial border window averages only its in-frame tokens: a 1 x 1 window is that token itself.
    assert torch.allclose(norm_spatial_pool(frames, 0.25, partial_windows=True)[:, 13, 13], frames[:, 26, 26])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(keep_ratio=0.3), "nsp_keep_ratio=0.3 is invalid"),
        (dict(keep_ratio=1 / 36), "larger than the padded frame"),
        # Issue 12 item 22: the config's words, where the argument enters.
        (dict(padding=-1), r"nsp_padding=-1 is invalid: allowed values are integers >= 0"),
        (dict(temperature=float("nan")), r"nsp_temperature=nan is invalid: allowed values are finite numbers > 0"),
        (dict(temperature=-1), r"nsp_temperature=-1 is invalid"),
        (dict(norm_p=-2), r"nsp_norm_p=-2 is invalid: allowed values are numbers > 0"),
        (dict(norm_p=0), r"nsp_norm_p=0 is invalid"),
        (dict(partial_windows="no"), r"nsp_partial_windows='no' is invalid: allowed values are True or False"),
    ],
)
@pytest.mark.parametrize("function", ["norm_spatial_pool", "st_grid_pool"])
def test_nsp_rejects_bad_arguments(kwargs, message, function):
    frames = torch.randn(1, 5, 5, 2)
    with pytest.raises(ValueError, match=message):
        if function == "norm_spatial_pool":
            norm_spatial_pool(frames, **{"keep_ratio": 0.25, **kwargs})
        else:
            st_grid_pool(frames, pyramid_levels=[], **{"keep_ratio": 0.25, **kwargs})


@pytest.mark.parametrize("function", [pyramid_temporal_grid, norm_spatial_pool, st_grid_pool])
def test_a_batch_of_videos_is_refused_by_every_function(function):
    """Issue 12 item 22: [B, T, H, W, D] is not one video; PTG returned it unchanged."""
    batch = torch.randn(2, 8, 3, 3, 2)
    kwargs = {pyramid_temporal_grid: dict(pyramid_levels=[(4, 2)]), norm_spatial_pool: dict(keep_ratio=0.25),
              st_grid_pool: dict(pyramid_levels=[(4, 2)], keep_ratio=0.25)}[function]  # fmt: skip
    with pytest.raises(ValueError, match=r"frames of shape \(2, 8, 3, 3, 2\) is invalid: allowed is one video"):
        function(batch, **kwargs)


@pytest.mark.parametrize(
    "temperature,norm_p,dim",
    [(1e39, 2.0, 8), (1e300, 2.0, 8), (1.0, 0.05, 3584), (1.0, 0.01, 3584), (1.0, 0.001, 64), (3.0, 1e6, 16)],
)
def test_nsp_is_finite_for_extreme_accepted_settings(temperature, norm_p, dim):
    """Issue 12 item 20: the softmax of scaled norms is computed stably, so accepted values never give NaN."""
    frames = torch.randn(2, 4, 4, dim) * (1 + torch.arange(4.0).reshape(1, 4, 1, 1))
    pooled = norm_spatial_pool(frames, 0.25, temperature=temperature, norm_p=norm_p)
    assert torch.isfinite(pooled).all()
    if temperature >= 1e39:  # the softmax becomes the arg-max: each window gives its largest-norm token
        windows = frames.reshape(2, 2, 2, 2, 2, dim).permute(0, 1, 3, 2, 4, 5).reshape(2, 2, 2, 4, dim)
        picked = windows.norm(dim=-1).argmax(-1)
        torch.testing.assert_close(
            pooled, windows.gather(3, picked[..., None, None].expand(-1, -1, -1, 1, dim))[..., 0, :]
        )


def test_nsp_zero_windows_average_evenly():
    """All-zero windows (e.g. padding) give equal weights, also at a huge temperature."""
    frames = torch.zeros(1, 2, 2, 3)
    for temperature in (1.0, 1e300):
        assert torch.equal(norm_spatial_pool(frames, 0.25, temperature=temperature), torch.zeros(1, 1, 1, 3))


def test_ptg_rejects_bad_levels():
    with pytest.raises(ValueError, match=r"level \[4, 0\] has stride 0"):
        pyramid_temporal_grid(torch.randn(8, 3, 3, 2), [(4, 0)])
