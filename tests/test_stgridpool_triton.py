"""The fast ST-GridPool path (cached PTG plans, summary bank, Triton kernels where they run) against the plain
vectorized reading of SPEC.md and the authors'-style loop reference, in float64, on random shapes and settings."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import modeling_stgridpool_llava as m  # noqa: E402
from benchmarks import loop_impl, plain_impl  # noqa: E402
from configuration_stgridpool import STGridPoolConfig  # noqa: E402
from stgridpool.tiny import build_tiny_tokenizer, tiny_config_kwargs  # noqa: E402

GOLDEN = ROOT / "tests" / "data" / "stgridpool_cases.safetensors"


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


def _random_video(shape, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    scale = 0.5 + 3 * torch.rand(*shape[:3], 1, generator=gen, dtype=torch.float64)  # varied norms: non-flat softmax
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _kwargs(case):
    return {k: case[k] for k in ("pyramid_levels", "keep_ratio", "temperature", "norm_p", "padding", "partial_windows")}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(video_settings())
def test_fast_path_matches_plain_and_reference(case):
    x = _random_video(case["shape"], case["seed"])
    kwargs = _kwargs(case)
    want = loop_impl.loop_st_grid_pool(x, **kwargs)
    plain = plain_impl.st_grid_pool(x, **kwargs)
    got64 = m.st_grid_pool(x, **kwargs)
    assert got64.shape == want.shape == plain.shape
    torch.testing.assert_close(got64, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(plain, want, rtol=1e-5, atol=1e-5)  # the plain reading computes NSP in float32
    got32 = m.st_grid_pool(x.float(), **kwargs)  # the float32 path users run on the CPU
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)
    ptg = m.pyramid_temporal_grid(x, case["pyramid_levels"])
    torch.testing.assert_close(ptg, loop_impl.loop_ptg(x, case["pyramid_levels"]), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(video_settings())
def test_nsp_alone_matches_reference(case):
    x = _random_video(case["shape"], case["seed"])
    args = (case["keep_ratio"], case["temperature"], case["norm_p"], case["padding"], case["partial_windows"])
    torch.testing.assert_close(m.norm_spatial_pool(x, *args), loop_impl.loop_nsp(x, *args), rtol=1e-9, atol=1e-9)


def test_golden_cases():
    from safetensors import safe_open

    with safe_open(str(GOLDEN), "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        for name, c in cases.items():
            x = f.get_tensor(f"{name}.input")
            levels = [tuple(level) for level in c["pyramid_levels"]]
            out = m.st_grid_pool(
                x, pyramid_levels=levels, keep_ratio=c["nsp_keep_ratio"], temperature=c["nsp_temperature"],
                norm_p=c["nsp_norm_p"], padding=c["nsp_padding"], partial_windows=c["nsp_partial_windows"],
            )  # fmt: skip
            torch.testing.assert_close(out.double(), f.get_tensor(f"{name}.expected").double(), rtol=0, atol=1e-5)
            ptg = m.pyramid_temporal_grid(x, levels)
            torch.testing.assert_close(ptg.double(), f.get_tensor(f"{name}.after_ptg").double(), rtol=0, atol=1e-5)


def test_plan_matches_spec_example():
    """SPEC.md's T = 64 example: summaries at 7, 15, ..., 63; the last ones written win."""
    plan = m.ptg_plan(64, 27, 27, ((4, 2), (4, 4), (4, 8)))
    assert plan.summary_positions == (7, 15, 23, 31, 39, 47, 55, 63)
    assert len(plan.kept_frames) == 56 and plan.num_summaries == 8 + 4 + 2
    assert m.ptg_plan(7, 27, 27, ((4, 2), (4, 4), (4, 8))).num_summaries == 0  # < 8 frames: PTG does nothing


def test_fallback_when_triton_unavailable(monkeypatch):
    x = _random_video((9, 5, 5, 6), 0, torch.float32)
    kwargs = dict(pyramid_levels=((4, 2),), keep_ratio=0.25)
    assert m.nsp_backend(x) == "torch"  # CPU tensors never take the CUDA kernels
    want = m.st_grid_pool(x, backend="torch", **kwargs)
    monkeypatch.setattr(m, "_triton_installed", lambda: False)
    assert m.nsp_backend(x) == "torch"
    torch.testing.assert_close(m.st_grid_pool(x, **kwargs), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="triton"):
        m.st_grid_pool(x, backend="triton", **kwargs)
    with pytest.raises(ValueError, match="backend"):
        m.st_grid_pool(x, backend="cuda", **kwargs)


def test_triton_on_a_cpu_tensor_is_refused_with_the_reason():
    """Issue 12 item 23: a clear ValueError, not Triton's "0 active drivers"."""
    x = _random_video((9, 5, 5, 6), 0, torch.float32)
    message = r"backend='triton' is invalid for a cpu tensor of torch.float32 .* need a CUDA tensor"
    if not m._triton_installed():
        pytest.skip("triton not installed")
    with pytest.raises(ValueError, match=message):
        m.st_grid_pool(x, backend="triton", pyramid_levels=((4, 2),), keep_ratio=0.25)
    with pytest.raises(ValueError, match=message):
        m.norm_spatial_pool(x, 0.25, backend="triton")


def test_the_triton_module_is_imported_only_where_used():
    """Issue 11: importing the model (and running it on the CPU) never imports the Triton kernels' module."""
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import modeling_stgridpool_llava as m
m.st_grid_pool(torch.randn(9, 5, 5, 6), pyramid_levels=((4, 2),), keep_ratio=0.25)
assert "stgridpool_triton" not in sys.modules
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script, str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_the_config_forces_the_pytorch_path(monkeypatch):
    """Issue 11: pooling_backend="torch" never asks for the Triton path, even where it would be chosen."""
    chosen = []
    monkeypatch.setattr(m, "nsp_backend", lambda frames, norm_p=2.0, temperature=1.0: chosen.append(1) or "triton")
    x = _random_video((9, 5, 5, 6), 0, torch.float32)
    settings = STGridPoolConfig().video_pooling
    out = m.pool_video(x, settings, backend="torch")
    torch.testing.assert_close(
        out, m.st_grid_pool(x, backend="torch", pyramid_levels=settings.pyramid_levels, keep_ratio=0.25)
    )
    assert not chosen
    with pytest.raises(
        ValueError, match=r"pooling_backend='cuda' is invalid: allowed values are \('auto', 'torch', 'triton'\)"
    ):
        STGridPoolConfig.from_dict({"pooling_backend": "cuda"})
    with pytest.raises(StrictDataclassError, match="pooling_backend"):
        STGridPoolConfig(pooling_backend="cuda")


@pytest.mark.skipif(not m._triton_installed(), reason="triton not installed")
def test_backend_choice_rules():
    x = torch.zeros(2, 3, 3, 4)
    assert m.nsp_backend(x) == "torch"
    meta = torch.empty(2, 3, 3, 4, device="meta")
    assert m.nsp_backend(meta) == "torch"
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        y = torch.zeros(2, 3, 3, 4, device="cuda", dtype=torch.bfloat16)
        assert m.nsp_backend(y) == "triton"
        assert m.nsp_backend(y, norm_p=math.inf) == "torch"
        assert m.nsp_backend(y, norm_p=0.05) == "torch" and m.nsp_backend(y, temperature=1e39) == "torch"
        assert m.nsp_backend(y.to(torch.int32)) == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode", ["stgridpool", "bilinear", "average"])
def test_pool_video_follows_input_and_never_modifies_it(mode, dtype):
    """Issue 8 too: the pooled video stays on the input's device (and dtype)."""
    config = STGridPoolConfig(**tiny_config_kwargs(build_tiny_tokenizer(), 27), video_pooling_mode=mode)
    x = _random_video((17, 27, 27, 8), 1, dtype)
    before = x.clone()
    out = m.pool_video(x, config.video_pooling)
    assert out.device == x.device and out.dtype == x.dtype
    assert tuple(out.shape) == (17, *config.pooled_frame_size, 8)
    assert torch.equal(x, before)
    assert torch.isfinite(out).all()


def test_stock_modes_match_stock_layout():
    x = _random_video((6, 27, 27, 16), 2, torch.float32)
    stock = torch.nn.functional.interpolate(x.permute(0, 3, 1, 2).contiguous(), size=(14, 14), mode="bilinear")
    torch.testing.assert_close(m.bilinear_pool(x), stock.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)
    avg = torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2).contiguous(), 2, 2)
    torch.testing.assert_close(m.average_pool(x), avg.permute(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_index_maps_are_cached():
    x = _random_video((20, 6, 6, 4), 3, torch.float32)
    m.st_grid_pool(x, pyramid_levels=((4, 2),), keep_ratio=0.25)
    hits = m._cached_device_maps.cache_info().hits
    m.st_grid_pool(x, pyramid_levels=((4, 2),), keep_ratio=0.25)
    assert m._cached_device_maps.cache_info().hits == hits + 1


def test_triton_launch_tables_are_cached():
    kernels = pytest.importorskip("stgridpool_triton")
    x = _random_video((20, 6, 6, 4), 3, torch.float32)
    plan = m.ptg_plan(20, 6, 6, ((4, 2),))
    first = kernels.launch_tables(x, ((4, 2),), plan)
    assert kernels.launch_tables(x, ((4, 2),), plan) is first
    assert [tuple(t.shape) for t in first["level_slots"]] == [(8, 5)] and first["nsp_entries"].shape == (20, 3)


def test_compile_fullgraph_no_graph_breaks():
    """torch.compile(fullgraph=True) raises on any graph break; the PyTorch path is what it compiles."""
    import functools

    kwargs = dict(
        pyramid_levels=((4, 2), (4, 4)), keep_ratio=0.25, temperature=0.7, norm_p=2.0, padding=1, partial_windows=True
    )
    fn = torch.compile(functools.partial(m.st_grid_pool, **kwargs), fullgraph=True, dynamic=False, backend="eager")
    x = _random_video((16, 7, 7, 8), 4, torch.float32)
    torch.testing.assert_close(fn(x), m.st_grid_pool(x, **kwargs), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not m._triton_installed(), reason="triton not installed")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled Triton kernels need a CUDA GPU")
@pytest.mark.parametrize("keep_ratio", [0.25, 1 / 9])  # at D = 3584: the one-pass and the two-pass NSP kernel
@pytest.mark.parametrize("norm_p", [1.0, 2.0, 3.0])
def test_compiled_nsp_kernels_match_pytorch_for_any_norm_p(keep_ratio, norm_p):  # pragma: no cover - GPU only
    """Both NSP kernels compile and agree with the PyTorch path for p = 2 and for the general p-norm (whose float
    constants once made the kernels compute in float64 and the two-pass loop fail to compile)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 27, 27, 3584, device="cuda", generator=g)
    got = m.norm_spatial_pool(x, keep_ratio, norm_p=norm_p, backend="triton")
    want = m.norm_spatial_pool(x.double(), keep_ratio, norm_p=norm_p, backend="torch")
    assert got.dtype == torch.float32
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-6


def test_triton_kernels_in_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter on small random cases (fresh process: the
    interpreter is chosen when the kernels are defined)."""
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import modeling_stgridpool_llava as m
from benchmarks.loop_impl import loop_st_grid_pool
cases = [((16, 7, 7, 40), ((4, 2), (4, 4)), 0.25, 1.0, 2.0, 0, False),
         ((13, 6, 5, 24), ((3, 2), (2, 3), (1, 1)), 1 / 9, 0.5, 1.0, 1, True),
         ((9, 5, 8, 70), ((6, 1),), 0.25, 2.0, 3.0, 0, True)]
for seed, (shape, levels, r, tau, p, pad, part) in enumerate(cases):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * (0.5 + 3 * torch.rand(*shape[:3], 1, generator=g))
    kw = dict(pyramid_levels=levels, keep_ratio=r, temperature=tau, norm_p=p, padding=pad, partial_windows=part)
    want = loop_st_grid_pool(x.double(), **kw)
    got = m.st_grid_pool(x, backend="triton", **kw)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < 1e-5, (shape, err)
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
