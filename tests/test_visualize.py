"""stgridpool.visualize's pure helpers: NSP token weights and the PTG trace and summary images."""

import numpy as np
import pytest
import torch

from configuration_stgridpool import VideoPoolingSettings
from modeling_stgridpool_llava import norm_spatial_pool
from stgridpool.visualize import nsp_token_weights, ptg_images, ptg_trace


@pytest.mark.parametrize("partial, padding", [(False, 0), (True, 0), (False, 1)])
def test_nsp_token_weights_reproduce_norm_spatial_pool(partial, padding):
    torch.manual_seed(0)
    frames = torch.randn(3, 9, 9, 5) * torch.rand(3, 9, 9, 1) * 3
    settings = VideoPoolingSettings(
        nsp_keep_ratio=0.25, nsp_temperature=2.0, nsp_padding=padding, nsp_partial_windows=partial
    )
    weights = nsp_token_weights(frames, settings)
    assert weights.shape == (3, 9, 9)
    pooled = norm_spatial_pool(frames, 0.25, temperature=2.0, padding=padding, partial_windows=partial)
    if padding == 0:  # reconstruct each window's output as sum(weight * token)
        weighted = torch.nan_to_num(weights)[..., None] * frames
        rows, cols = pooled.shape[1:3]
        sums = torch.zeros_like(pooled)
        for i in range(rows):
            for j in range(cols):
                sums[:, i, j] = weighted[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].sum((1, 2))
        torch.testing.assert_close(sums, pooled, atol=1e-5, rtol=1e-5)
        assert bool(torch.isnan(weights[:, 8]).all()) != partial  # the 9th row: dropped unless partial windows
        if partial:  # a border window of 2 tokens: its weights sum to 1
            torch.testing.assert_close(weights[:, 8, 0:2].sum(-1), torch.ones(3))
    else:  # padded windows hold zero tokens too: in-frame weights sum to less than 1 there
        assert float(weights[:, 0, 0].max()) < 1 and not bool(torch.isnan(weights).any())


def test_ptg_trace_matches_spec_example():
    trace = ptg_trace(64, [(4, 2), (4, 4), (4, 8)])
    written = {t: entry["level"] for t, entry in enumerate(trace) if entry}
    assert written == {7: 1, 15: 2, 23: 1, 31: 3, 39: 1, 47: 2, 55: 1, 63: 3}
    assert trace[7]["sources"] == [1, 3, 5, 7] and trace[31]["sources"] == [7, 15, 23, 31]
    assert ptg_trace(7, [(4, 2), (4, 4), (4, 8)]) == [None] * 7


def test_ptg_images_tile_the_source_frames():
    from PIL import Image

    colors = [(i * 30, 0, 0) for i in range(8)]
    images = [Image.new("RGB", (10, 10), c) for c in colors]
    out = ptg_images(images, [(4, 2)])  # samples 1, 3, 5, 7 -> one 2x2 summary at 7
    assert [np.asarray(o).tolist() == np.asarray(i).tolist() for o, i in zip(out[:7], images[:7])] == [True] * 7
    mosaic = np.asarray(out[7])
    assert mosaic.shape == (10, 10, 3)
    assert [tuple(mosaic[r, c]) for r, c in ((0, 0), (0, 9), (9, 0), (9, 9))] == [
        colors[1],
        colors[3],
        colors[5],
        colors[7],
    ]
