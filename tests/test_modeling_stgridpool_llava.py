"""modeling_stgridpool_llava: the pure pooling functions (PTG, NSP) against the paper authors' reference outputs
(tests/data, see SPEC.md), the fast path (cached PTG plans, summary bank) against the plain vectorized reading of
SPEC.md and the authors'-style loop reference on random shapes and settings, and the model subclasses against the stock
LLaVA-OneVision classes (SPEC.md section 3). The Triton kernels and the backend choice: test_stgridpool_triton.py."""

import json

import hypothesis
import numpy as np
import pytest
import torch
from conftest import GOLDEN, random_features
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.utils import logging as transformers_logging

from benchmarks import loop_impl, plain_impl
from configuration_stgridpool import STGridPoolConfig
from modeling_stgridpool_llava import (
    _TRANSFORMERS_5_17,
    STGridPoolLlavaOnevisionForConditionalGeneration,
    _cached_device_maps,
    add_video_newlines,
    average_pool,
    bilinear_pool,
    norm_spatial_pool,
    pool_video,
    ptg_plan,
    pyramid_temporal_grid,
    sampled_positions,
    st_grid_pool,
    summary_layout,
)
from processing_stgridpool import STGridPoolProcessor
from stgridpool.demo import build_tiny_processor, build_tiny_tokenizer, tiny_config_kwargs

# ---------------------------------------------------------------------------------------------------------------
# The pure functions against the authors' reference outputs and SPEC.md
# ---------------------------------------------------------------------------------------------------------------


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


@pytest.mark.transformers_free
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


@pytest.mark.transformers_free
@pytest.mark.parametrize("params,frames,after_ptg,expected", load_cases())
def test_golden_bfloat16(params, frames, after_ptg, expected):
    # bf16 keeps 8 significant bits: unit roundoff u = 2^-9. The input is rounded once, PTG's summaries once more,
    # the output once, and the softmax weights move with the rounded norms; each output is a convex combination of
    # window tokens, so each of those four costs at most ~2u * max|x|. Hence 8u * max|x| = 2^-6 * max|x|.
    pooled = st_grid_pool(frames.bfloat16(), **pool_args(params))
    assert pooled.dtype == torch.bfloat16
    tolerance = 2**-6 * frames.abs().max().item()
    assert (pooled.double() - expected.double()).abs().max().item() <= tolerance


@pytest.mark.transformers_free
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


@pytest.mark.transformers_free
def test_sampled_positions_match_spec_example():
    # SPEC.md: T = 64, level (4, 2) samples frames 1, 3, ..., 63; level (4, 8) samples 7, 15, ..., 63.
    assert sampled_positions(64, 2) == tuple(range(1, 64, 2))
    assert sampled_positions(64, 8) == tuple(range(7, 64, 8))
    assert sampled_positions(3, 4) == ()


@pytest.mark.transformers_free
def test_ptg_writes_summaries_where_spec_says():
    frames = torch.randn(64, 27, 27, 3)
    out = pyramid_temporal_grid(frames, [(4, 2), (4, 4), (4, 8)])
    changed = {t for t in range(64) if not torch.equal(out[t], frames[t])}
    assert changed == set(range(7, 64, 8))  # (4,2) writes 7, 15, ..., 63; (4,4) and (4,8) write subsets of those
    assert torch.equal(pyramid_temporal_grid(frames[:7], [(4, 2), (4, 4), (4, 8)]), frames[:7])
    assert torch.equal(pyramid_temporal_grid(frames, []), frames)


@pytest.mark.transformers_free
def test_ptg_summary_tiles_are_area_averages_of_the_chunk():
    frames = torch.randn(8, 27, 27, 2)
    out = pyramid_temporal_grid(frames, [(4, 2)])  # samples 1, 3, 5, 7 -> one summary at 7, 2x2 tiles of 14
    tile = torch.nn.functional.adaptive_avg_pool2d(frames[5].permute(2, 0, 1), (14, 14)).permute(1, 2, 0)
    assert torch.allclose(
        out[7, 14:, :13], tile[:13, :13], atol=1e-6
    )  # frame k=2 -> tile row 1, column 0, cropped to 27


@pytest.mark.transformers_free
def test_nsp_is_a_norm_softmax_weighted_window_sum():
    frames = torch.randn(2, 4, 4, 5)
    pooled = norm_spatial_pool(frames, keep_ratio=0.25, temperature=2.0, norm_p=3.0)
    window = frames[1, 2:4, 0:2].reshape(4, 5)
    weights = torch.softmax(2.0 * window.norm(p=3, dim=-1) / 5 ** (1 / 3), dim=0)
    assert pooled.shape == (2, 2, 2, 5)
    assert torch.allclose(pooled[1, 1, 0], (weights[:, None] * window).sum(0), atol=1e-6)


@pytest.mark.transformers_free
def test_nsp_geometry():
    frames = torch.randn(3, 27, 27, 4)
    assert norm_spatial_pool(frames, 0.25).shape == (3, 13, 13, 4)
    assert norm_spatial_pool(frames, 0.25, partial_windows=True).shape == (3, 14, 14, 4)
    assert norm_spatial_pool(frames, 1 / 9, padding=1).shape == (3, 9, 9, 4)
    assert torch.equal(norm_spatial_pool(frames, 1.0), frames)
    # A partial border window averages only its in-frame tokens: a 1 x 1 window is that token itself.
    assert torch.allclose(norm_spatial_pool(frames, 0.25, partial_windows=True)[:, 13, 13], frames[:, 26, 26])


@pytest.mark.transformers_free
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


@pytest.mark.transformers_free
@pytest.mark.parametrize("function", [pyramid_temporal_grid, norm_spatial_pool, st_grid_pool])
def test_a_batch_of_videos_is_refused_by_every_function(function):
    """Issue 12 item 22: [B, T, H, W, D] is not one video; PTG returned it unchanged."""
    batch = torch.randn(2, 8, 3, 3, 2)
    kwargs = {pyramid_temporal_grid: dict(pyramid_levels=[(4, 2)]), norm_spatial_pool: dict(keep_ratio=0.25),
              st_grid_pool: dict(pyramid_levels=[(4, 2)], keep_ratio=0.25)}[function]  # fmt: skip
    with pytest.raises(ValueError, match=r"frames of shape \(2, 8, 3, 3, 2\) is invalid: allowed is one video"):
        function(batch, **kwargs)


@pytest.mark.transformers_free
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


@pytest.mark.transformers_free
def test_nsp_zero_windows_average_evenly():
    """All-zero windows (e.g. padding) give equal weights, also at a huge temperature."""
    frames = torch.zeros(1, 2, 2, 3)
    for temperature in (1.0, 1e300):
        assert torch.equal(norm_spatial_pool(frames, 0.25, temperature=temperature), torch.zeros(1, 1, 1, 3))


@pytest.mark.transformers_free
def test_ptg_rejects_bad_levels():
    with pytest.raises(ValueError, match=r"level \[4, 0\] has stride 0"):
        pyramid_temporal_grid(torch.randn(8, 3, 3, 2), [(4, 0)])


def features_with_zeros(shape, k, dtype=torch.float64, seed=0):
    """random_features with frame 0's top-left k x k window all zero tokens and one zero token (frame -1, last row,
    first column) among non-zero ones: where a norm has no derivative."""
    frames = random_features(shape, seed, dtype)
    frames[0, :k, :k] = 0
    frames[-1, -1, 0] = 0
    return frames


# (keep ratio, temperature, norm p, padding, partial windows) on 5 x 5 frames: whole and partial windows, padding,
# the 1 x 1 window (no pooling), each norm.
NSP_GRAD_CASES = [
    (0.25, 1.0, 2.0, 0, False),
    (0.25, 0.5, 1.0, 1, True),
    (0.25, 3.0, 3.0, 0, True),
    (1 / 9, 1.0, 3.0, 0, True),
    (1 / 9, 2.0, 2.0, 1, False),
    (1 / 9, 1.0, 1.0, 2, True),
    (1.0, 1.0, 2.0, 0, False),
]


@pytest.mark.transformers_free
@pytest.mark.parametrize("keep_ratio,temperature,norm_p,padding,partial_windows", NSP_GRAD_CASES)
def test_nsp_gradcheck(keep_ratio, temperature, norm_p, padding, partial_windows):
    """NSP is differentiable everywhere, an all-zero window and a zero token included (the norm's subgradient 0)."""
    k = round(keep_ratio**-0.5)
    frames = features_with_zeros((2, 5, 5, 3), k).requires_grad_()
    kwargs = dict(temperature=temperature, norm_p=norm_p, padding=padding, partial_windows=partial_windows)
    assert torch.autograd.gradcheck(lambda x: norm_spatial_pool(x, keep_ratio, **kwargs), (frames,))


@pytest.mark.transformers_free
@pytest.mark.parametrize(
    "keep_ratio,norm_p,partial_windows", [(0.25, 2.0, False), (1 / 9, 3.0, True), (1.0, 2.0, False)]
)
def test_st_grid_pool_gradcheck(keep_ratio, norm_p, partial_windows):
    """Through PTG's area resizes and index copies too: two levels, the second reading the first's summaries (keep
    ratio 1: NSP keeps every token, so the gradient is PTG's alone). gradcheck's fast mode (random projections of
    the Jacobian) keeps it quick on 320 inputs."""
    frames = features_with_zeros((8, 5, 4, 2), round(keep_ratio**-0.5)).requires_grad_()
    kwargs = dict(
        pyramid_levels=[(2, 1), (4, 2)], keep_ratio=keep_ratio, norm_p=norm_p, partial_windows=partial_windows
    )
    assert ptg_plan(8, 5, 4, ((2, 1), (4, 2))).levels[1].bank_slots  # the second level reads summaries
    assert torch.autograd.gradcheck(lambda x: st_grid_pool(x, **kwargs), (frames,), fast_mode=True)


@pytest.mark.transformers_free
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_p", [1.0, 2.0, 3.0])
def test_gradients_are_finite_on_random_input_and_zero_windows(dtype, norm_p):
    frames = features_with_zeros((9, 27, 27, 16), 2, dtype).requires_grad_()
    pooled = st_grid_pool(frames, pyramid_levels=[(4, 2)], keep_ratio=0.25, norm_p=norm_p, padding=1)
    upstream = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (pooled * upstream).sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    # An all-zero video: every window averages evenly and the norms add nothing (their subgradient 0 at zero), so
    # each token's gradient is its window's upstream gradient / k^2.
    zeros = torch.zeros(2, 4, 4, 3, dtype=dtype, requires_grad=True)
    upstream = torch.randn(2, 2, 2, 3, generator=torch.Generator().manual_seed(2)).to(dtype)
    (norm_spatial_pool(zeros, 0.25, norm_p=norm_p) * upstream).sum().backward()
    expected = upstream.repeat_interleave(2, 1).repeat_interleave(2, 2) / 4
    torch.testing.assert_close(zeros.grad, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The fast path against the plain reading of SPEC.md and the authors'-style loop reference (float64)
# ---------------------------------------------------------------------------------------------------------------


@st.composite
def video_settings(draw):
    """A random video and ST-GridPool settings whose NSP window fits the padded frame."""
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    padding = draw(st.integers(0, 2))
    k = draw(st.integers(1, min(4, height + 2 * padding, width + 2 * padding)))
    levels = tuple(draw(st.lists(st.tuples(st.integers(1, 9), st.integers(1, 4)), max_size=3)))
    return dict(
        shape=(draw(st.integers(1, 40)), height, width, draw(st.integers(1, 24))),
        pyramid_levels=levels,
        keep_ratio=1 / k**2,
        temperature=draw(st.sampled_from([0.25, 1.0, 3.0])),
        norm_p=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0])),
        padding=padding,
        partial_windows=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _kwargs(case):
    return {k: case[k] for k in ("pyramid_levels", "keep_ratio", "temperature", "norm_p", "padding", "partial_windows")}


@hypothesis.settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(video_settings())
def test_fast_path_matches_plain_and_reference(case):
    x = random_features(case["shape"], case["seed"])
    kwargs = _kwargs(case)
    want = loop_impl.loop_st_grid_pool(x, **kwargs)
    plain = plain_impl.st_grid_pool(x, **kwargs)
    got64 = st_grid_pool(x, **kwargs)
    assert got64.shape == want.shape == plain.shape
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)  # the plain reading computes NSP in float32
    got32 = st_grid_pool(x.float(), **kwargs)  # the float32 path users run on the CPU
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    ptg = pyramid_temporal_grid(x, case["pyramid_levels"])
    torch.testing.assert_close(ptg, loop_impl.loop_ptg(x, case["pyramid_levels"]), rtol=1e-12, atol=1e-12)


@hypothesis.settings(max_examples=25, deadline=None)
@given(video_settings())
def test_nsp_alone_matches_reference(case):
    x = random_features(case["shape"], case["seed"])
    args = (case["keep_ratio"], case["temperature"], case["norm_p"], case["padding"], case["partial_windows"])
    torch.testing.assert_close(norm_spatial_pool(x, *args), loop_impl.loop_nsp(x, *args), rtol=1e-9, atol=1e-9)


def test_plan_matches_spec_example():
    """SPEC.md's T = 64 example: summaries at 7, 15, ..., 63; the last ones written win."""
    plan = ptg_plan(64, 27, 27, ((4, 2), (4, 4), (4, 8)))
    assert plan.summary_positions == (7, 15, 23, 31, 39, 47, 55, 63)
    assert len(plan.kept_frames) == 56 and plan.num_summaries == 8 + 4 + 2
    assert ptg_plan(7, 27, 27, ((4, 2), (4, 4), (4, 8))).num_summaries == 0  # < 8 frames: PTG does nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["stgridpool", "bilinear", "average"])
def test_pool_video_follows_input_and_never_modifies_it(mode, dtype):
    """Issue 8 too: the pooled video stays on the input's device (and dtype)."""
    config = STGridPoolConfig(**tiny_config_kwargs(build_tiny_tokenizer(), 27), video_pooling_mode=mode)
    x = random_features((17, 27, 27, 8), 1, dtype)
    before = x.clone()
    out = pool_video(x, config.video_pooling)
    assert out.device == x.device and out.dtype == x.dtype
    assert tuple(out.shape) == (17, *config.pooled_frame_size, 8)
    assert torch.equal(x, before)
    assert torch.isfinite(out).all()


def test_stock_modes_match_stock_layout():
    x = random_features((6, 27, 27, 16), 2, torch.float32)
    stock = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(14, 14), mode="bilinear")
    torch.testing.assert_close(bilinear_pool(x), stock.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    avg = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).contiguous(), 2, 2)
    torch.testing.assert_close(average_pool(x), avg.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_index_maps_are_cached():
    x = random_features((20, 6, 6, 4), 3, torch.float32)
    st_grid_pool(x, pyramid_levels=((4, 2),), keep_ratio=0.25)
    hits = _cached_device_maps.cache_info().hits
    st_grid_pool(x, pyramid_levels=((4, 2),), keep_ratio=0.25)
    assert _cached_device_maps.cache_info().hits == hits + 1


def test_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) raises on any graph break; the PyTorch path is what it compiles."""
    import functools

    kwargs = dict(
        pyramid_levels=((4, 2), (4, 4)), keep_ratio=0.25, temperature=0.7, norm_p=2.0, padding=1, partial_windows=True
    )
    fn = torch.compile(functools.partial(st_grid_pool, **kwargs), fullgraph=True, dynamic=False, backend="eager")
    x = random_features((16, 7, 7, 8), 4, torch.float32)
    torch.testing.assert_close(fn(x), st_grid_pool(x, **kwargs), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The model and processor subclasses against the stock classes
# ---------------------------------------------------------------------------------------------------------------


MODES = ("stgridpool", "bilinear", "average")
NEWLINES = ("one_token", "grid", "frame", "none")


def random_video(num_frames, height=40, width=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def chat(processor, *contents, **kwargs):
    messages = [{"role": "user", "content": [*contents, {"type": "text", "text": "what is happening"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


@pytest.fixture(scope="module")
def stock(tiny_stock_dir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_stock_dir).eval()


@pytest.fixture(scope="module")
def stock_processor(tiny_stock_dir):
    return LlavaOnevisionProcessor.from_pretrained(tiny_stock_dir)


def load_ours(tiny_stock_dir, **settings):
    model, info = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_stock_dir, output_loading_info=True, **settings
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_stock_checkpoint_loads_with_every_weight(tiny_stock_dir, stock):
    ours = load_ours(tiny_stock_dir)
    assert isinstance(ours.config, STGridPoolConfig)
    stock_state = stock.state_dict()
    assert ours.state_dict().keys() == stock_state.keys()
    assert all(torch.equal(value, stock_state[name]) for name, value in ours.state_dict().items())


@pytest.mark.parametrize("kind", ["video", "image", "text"])
def test_bilinear_mode_equals_stock(tiny_stock_dir, stock, stock_processor, kind):
    ours = load_ours(tiny_stock_dir, video_pooling_mode="bilinear")
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, video_pooling_mode="bilinear")
    media = {
        "video": dict(videos=[random_video(6)]),
        "image": dict(images=[Image.fromarray(random_video(1, 60, 90)[0])]),
        "text": {},
    }[kind]
    content = [] if kind == "text" else [{"type": kind}]
    inputs = processor(text=chat(processor, *content), return_tensors="pt", **media)
    stock_inputs = stock_processor(text=chat(stock_processor, *content), return_tensors="pt", **media)
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    with torch.no_grad():
        ours_out, stock_out = ours(**inputs), stock(**inputs)
    assert (ours_out.logits - stock_out.logits).abs().max() <= 1e-5
    # The same output fields as stock (video_outputs on 5.24, video_hidden_states on 5.17), filled alike.
    assert type(ours_out) is type(stock_out) and list(ours_out.keys()) == list(stock_out.keys())


def hidden_states_kept(output) -> int:
    return sum(state is not None for state in output.hidden_states or ())


def test_get_video_features_follows_the_stock_contract(tiny_stock_dir, stock):
    """Issue 11: a tuple with return_dict=False, the stock fields, and no more vision layers kept than stock."""
    ours = load_ours(tiny_stock_dir)
    pixels = torch.randn(2, 3, 3, 54, 54)
    with torch.no_grad():
        ours_out, stock_out = ours.model.get_video_features(pixels), stock.model.get_video_features(pixels)
        ours_tuple = ours.model.get_video_features(pixels, return_dict=False)
        stock_tuple = stock.model.get_video_features(pixels, return_dict=False)
        via_generation_class = ours.get_video_features(pixels, return_dict=False)
    assert type(ours_out) is type(stock_out) and list(ours_out.keys()) == list(stock_out.keys())
    assert isinstance(ours_tuple, tuple) and isinstance(stock_tuple, tuple) and len(ours_tuple) == len(stock_tuple)
    assert isinstance(via_generation_class, tuple)
    assert torch.equal(ours_tuple[list(ours_out.keys()).index("pooler_output")], ours_out.pooler_output)
    assert 1 <= hidden_states_kept(ours_out) <= hidden_states_kept(stock_out)
    # The config's return_dict is honoured as stock does.
    ours.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(ours.model.get_video_features(pixels), tuple)
    finally:
        ours.config.return_dict = True


def test_get_video_features_keeps_only_the_vision_layer_it_uses(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir)
    layers = ours.config.vision_config.num_hidden_layers + 1
    with torch.no_grad():
        kept = hidden_states_kept(ours.model.get_video_features(torch.randn(1, 2, 3, 54, 54)))
    assert kept == (layers if _TRANSFORMERS_5_17 else 1)  # 5.17's stock tower cannot select layers
    # A caller asking for every hidden state still gets them.
    with torch.no_grad():
        every = ours.model.get_video_features(torch.randn(1, 2, 3, 54, 54), output_hidden_states=True)
    assert hidden_states_kept(every) == layers


def test_project_video_frames_is_the_path_get_video_features_pools(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir, video_pooling_mode="average", video_newline_position="none")
    pixels = torch.randn(2, 3, 3, 54, 54)
    with torch.no_grad():
        frames = ours.model.project_video_frames(pixels)
        features = ours.model.get_video_features(pixels).pooler_output
        hidden = ours.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
    assert frames.shape == (2, 3, 27, 27, 32)
    torch.testing.assert_close(frames, ours.model.multi_modal_projector(hidden).reshape(2, 3, 27, 27, -1))
    torch.testing.assert_close(features, average_pool(frames.flatten(0, 1)).reshape(2, -1, 32))


def test_generation_class_lists_generation_mixin():
    assert GenerationMixin in STGridPoolLlavaOnevisionForConditionalGeneration.__bases__


def test_loading_a_stock_checkpoint_does_not_warn(tiny_stock_dir):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        load_ours(tiny_stock_dir)
        STGridPoolConfig.from_pretrained(tiny_stock_dir)
    finally:
        logger.removeHandler(handler)
    assert not [
        r for r in records if "another model type" in r.getMessage() or "instantiate a model of type" in r.getMessage()
    ]


def test_stgridpool_features_are_st_grid_pool_of_each_videos_projection(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir, pyramid_levels=[[2, 1], [4, 2]])
    config = ours.config
    pixels = torch.randn(2, 9, 3, 54, 54)
    with torch.no_grad():
        features = ours.get_video_features(pixels).pooler_output
        hidden = ours.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        projected = ours.model.multi_modal_projector(hidden).reshape(2, 9, 27, 27, -1)
    for video, video_features in zip(projected, features):
        pooled = st_grid_pool(video, pyramid_levels=config.pyramid_levels, keep_ratio=config.nsp_keep_ratio)
        expected = add_video_newlines(pooled, ours.model.image_newline, "one_token")
        assert video_features.shape == (9 * 13 * 13 + 1, 32)
        assert torch.allclose(video_features, expected, atol=1e-6)
    # Each video is pooled on its own: the second video's features do not depend on the first's frames.
    with torch.no_grad():
        alone = ours.get_video_features(pixels[1:]).pooler_output
    assert torch.allclose(alone[0], features[1], atol=1e-6)


SWEEP_FRAME_SIZE = 7  # odd, like 27, and small so forward passes stay quick
SWEEP = [(mode, newline) for mode in MODES for newline in NEWLINES]


@pytest.fixture(scope="module")
def sweep_tokenizer():
    return build_tiny_tokenizer()


def sweep_processor(tokenizer, mode, newline):
    return build_tiny_processor(
        tokenizer, SWEEP_FRAME_SIZE, processor_class=STGridPoolProcessor,
        video_pooling_mode=mode, video_newline_position=newline,
    )  # fmt: skip


@pytest.mark.parametrize("mode,newline", SWEEP)
def test_processor_count_equals_model_geometry_for_every_frame_count(sweep_tokenizer, mode, newline):
    """T = 1..70 for each mode x newline position, without forward passes: the processor's count, the settings'
    count and the length of what the model's pooling and layout functions make, all equal."""
    processor = sweep_processor(sweep_tokenizer, mode, newline)
    settings = STGridPoolConfig(video_pooling_mode=mode, video_newline_position=newline).video_pooling
    side = SWEEP_FRAME_SIZE
    for num_frames in range(1, 71):
        pooled = pool_video(torch.zeros(num_frames, side, side, 1), settings)
        made = add_video_newlines(pooled, torch.zeros(1), newline).shape[0]
        count = processor.num_video_tokens(num_frames)
        assert count == settings.num_tokens(num_frames, side, side) == made, (mode, newline, num_frames)
        assert processor._get_num_multimodal_tokens(video_sizes=[(num_frames, 14, 14)]).num_video_tokens == [count]
    text = chat(processor, {"type": "video"})
    for num_frames in (1, 8, 33, 70):  # the prompt itself, at a few counts
        inputs = processor(text=text, videos=[random_video(num_frames, 14, 14, seed=num_frames)], return_tensors="pt")
        assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum()) == (
            processor.num_video_tokens(num_frames)
        )


def _forward_sweep(tokenizer, frame_counts):
    torch.manual_seed(0)
    model = STGridPoolLlavaOnevisionForConditionalGeneration(
        STGridPoolConfig(**tiny_config_kwargs(tokenizer, SWEEP_FRAME_SIZE))
    ).eval()
    for mode, newline in SWEEP:
        model.config.video_pooling_mode = mode
        model.config.video_newline_position = newline
        processor = sweep_processor(tokenizer, mode, newline)
        text = chat(processor, {"type": "video"})
        for num_frames in frame_counts:
            video = random_video(num_frames, 14, 14, seed=num_frames)
            inputs = processor(text=text, videos=[video], return_tensors="pt")
            num_placeholders = int((inputs["input_ids"] == model.config.video_token_id).sum())
            assert num_placeholders == processor.num_video_tokens(num_frames)
            with torch.no_grad():
                features = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
                assert features.shape[1] == num_placeholders, (mode, newline, num_frames)
                logits = model(**inputs).logits
            assert logits.shape[1] == inputs["input_ids"].shape[1]


def test_placeholders_equal_features_in_a_few_forward_passes(sweep_tokenizer):
    """Every mode x newline position, forward passes at two frame counts (no PTG level, and two levels)."""
    _forward_sweep(sweep_tokenizer, (1, 17))


@pytest.mark.slow_sweep
@pytest.mark.parametrize("first", range(1, 71, 10), ids=lambda first: f"T{first}-{first + 9}")
def test_placeholders_equal_features_for_every_mode_newline_and_frame_count(sweep_tokenizer, first):
    """The full sweep: T = 1..70 x 4 newline positions x 3 modes, 840 forward passes (`pytest -m slow_sweep`), in
    chunks of 10 frame counts that pytest-xdist can share among workers."""
    _forward_sweep(sweep_tokenizer, range(first, first + 10))


@pytest.mark.parametrize(
    "settings",
    [dict(nsp_keep_ratio=1 / 9, nsp_padding=1), dict(nsp_partial_windows=True), dict(nsp_keep_ratio=1.0)],
    ids=["3x3-pad1", "partial", "no-pooling"],
)
def test_other_nsp_geometries_agree_with_the_processor(tiny_stock_dir, settings):
    ours = load_ours(tiny_stock_dir, **settings)
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, **settings)
    for num_frames in (1, 8, 17):
        inputs = processor(
            text=chat(processor, {"type": "video"}), videos=[random_video(num_frames)], return_tensors="pt"
        )
        with torch.no_grad():
            assert ours(**inputs).logits.isfinite().all()


def test_processor_saves_and_reloads_its_settings(tiny_stock_dir, tmp_path):
    settings = dict(video_pooling_mode="average", nsp_keep_ratio=1 / 9, nsp_padding=1, nsp_partial_windows=True,
                    video_newline_position="grid")  # fmt: skip
    STGridPoolProcessor.from_pretrained(tiny_stock_dir, **settings).save_pretrained(tmp_path)
    reloaded = STGridPoolProcessor.from_pretrained(tmp_path)
    assert {k: getattr(reloaded, k) for k in settings} == settings
    # The stock arguments survive the round trip too (Transformers rebuilds processors from __init__'s signature).
    assert reloaded.num_image_tokens == 27 * 27
    assert reloaded.vision_feature_select_strategy == "full"
    assert reloaded.chat_template is not None


def test_processor_rejects_bad_settings(tiny_stock_dir):
    with pytest.raises(ValueError, match=r"video_newline_position='row' is invalid"):
        STGridPoolProcessor.from_pretrained(tiny_stock_dir, video_newline_position="row")


@pytest.mark.parametrize(
    "processor_settings,num_placeholders", [({}, 4 * 14 * 14 + 1), ({"nsp_keep_ratio": 1 / 25}, 4 * 5 * 5 + 1)],
    ids=["stock", "keep-ratio-1/25"],
)  # fmt: skip
def test_mismatch_error_says_what_differs(tiny_stock_dir, stock_processor, processor_settings, num_placeholders):
    """A processor counting with other settings: the error gives the count expected (under the model's settings, for
    that many frames) and the count got. The model's default is 4 x 13 x 13 + 1 = 677 tokens for 4 frames."""
    ours = load_ours(tiny_stock_dir)
    processor = (
        STGridPoolProcessor.from_pretrained(tiny_stock_dir, **processor_settings)
        if processor_settings
        else stock_processor
    )
    inputs = processor(text=chat(processor, {"type": "video"}), videos=[random_video(4)], return_tensors="pt")
    with pytest.raises(ValueError) as error:
        ours(**inputs)
    message = str(error.value)
    assert f"The prompt has {num_placeholders} <video> placeholder tokens, but the model expected 677" in message
    assert "1 video(s) of 4 frames of 27x27 tokens, 677 tokens a video" in message
    assert "{'video_pooling_mode': 'stgridpool', 'nsp_keep_ratio': 0.25, 'nsp_padding': 0" in message, message


def test_fine_tuning_steps_through_st_grid_pool(sweep_tokenizer):
    """Projector and language model trained with ST-GridPool (PTG and NSP) in the forward: every gradient finite, the
    projector's non-zero (it flows through the pooling), and the loss falls."""
    torch.manual_seed(0)
    model = STGridPoolLlavaOnevisionForConditionalGeneration(
        STGridPoolConfig(**tiny_config_kwargs(sweep_tokenizer, SWEEP_FRAME_SIZE), pyramid_levels=[[2, 1], [4, 2]])
    ).train()
    model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    processor = sweep_processor(sweep_tokenizer, "stgridpool", "one_token")
    inputs = processor(
        text=chat(processor, {"type": "video"}) + " a dog is moving", videos=[random_video(8, 14, 14)],
        return_tensors="pt",
    )  # fmt: skip
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.video_token_id, -100)
    optimizer = torch.optim.Adam(trainable, lr=3e-3)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in trainable), "a non-finite gradient"
        assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_generate_on_a_video_a_batch_of_two_and_an_image_with_a_video(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir)
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir)
    image = Image.fromarray(random_video(1, 60, 90, seed=3)[0])
    cases = {
        "one video": dict(text=[chat(processor, {"type": "video"})], videos=[random_video(8)]),
        "two videos": dict(
            text=[chat(processor, {"type": "video"}), chat(processor, {"type": "video"}) + " describe"],
            videos=[random_video(8, seed=1), random_video(8, seed=2)],
            padding=True,
        ),
        "image and video": dict(
            text=[chat(processor, {"type": "image"}, {"type": "video"})], images=[image], videos=[random_video(8)]
        ),
    }
    for name, kwargs in cases.items():
        inputs = processor(return_tensors="pt", **kwargs)
        out = ours.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (len(kwargs["text"]), inputs["input_ids"].shape[1] + 4), name
    # Greedy decoding of one video alone and inside the batch agrees (videos are pooled independently).
    single = processor(text=[chat(processor, {"type": "video"})], videos=[random_video(8, seed=1)], return_tensors="pt")
    batch = processor(return_tensors="pt", **cases["two videos"])
    alone = ours.generate(**single, max_new_tokens=4, do_sample=False)[0, -4:]
    batched = ours.generate(**batch, max_new_tokens=4, do_sample=False)[0, -4:]
    assert torch.equal(alone, batched)
