"""stgridpool_triton and the backend choice: the Triton kernels (in Triton's CPU interpreter here, compiled where a
GPU is), the fallback to the PyTorch path, and where the kernels' module is imported."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, random_features
from huggingface_hub.errors import StrictDataclassError

import modeling_stgridpool_llava as m
from configuration_stgridpool import STGridPoolConfig


def test_fallback_when_triton_unavailable(monkeypatch):
    x = random_features((9, 5, 5, 6), 0, torch.float32)
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
    x = random_features((9, 5, 5, 6), 0, torch.float32)
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
    x = random_features((9, 5, 5, 6), 0, torch.float32)
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


def test_triton_launch_tables_are_cached():
    kernels = pytest.importorskip("stgridpool_triton")
    x = random_features((20, 6, 6, 4), 3, torch.float32)
    plan = m.ptg_plan(20, 6, 6, ((4, 2),))
    first = kernels.launch_tables(x, ((4, 2),), plan)
    assert kernels.launch_tables(x, ((4, 2),), plan) is first
    assert [tuple(t.shape) for t in first["level_slots"]] == [(8, 5)] and first["nsp_entries"].shape == (20, 3)


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


@pytest.mark.transformers_free
@pytest.mark.skipif(not m._triton_installed(), reason="triton not installed")
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


@pytest.mark.transformers_free
@pytest.mark.skipif(not m._triton_installed(), reason="triton not installed")
def test_gradients_hand_over_to_pytorch_in_interpreter():
    """The kernels have no backward: "auto" takes them only where no gradient is needed (with the interpreter on, on
    CPU tensors too, as on CUDA), else the PyTorch path, whose gradients are the same as backend="torch"'s; "triton"
    asked for explicitly with a gradient needed is refused."""
    script = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import modeling_stgridpool_llava as m
calls = []
kernels = m._triton_kernels
m._triton_kernels = lambda: calls.append(1) or kernels()
g = torch.Generator().manual_seed(0)
x = torch.randn(9, 5, 5, 16, generator=g) * (0.5 + 3 * torch.rand(9, 5, 5, 1, generator=g))
kw = dict(pyramid_levels=((4, 2),), keep_ratio=0.25, norm_p=3.0, padding=1)
with torch.no_grad():
    m.st_grid_pool(x.clone().requires_grad_(), **kw)
m.st_grid_pool(x, **kw)  # grad mode, but nothing asks for a gradient
assert len(calls) == 2, calls
calls.clear()
levels = [(2, 1), (4, 2)]
for name, pool in [("st_grid_pool", lambda t, b: m.st_grid_pool(t, backend=b, **kw)),
                   ("norm_spatial_pool", lambda t, b: m.norm_spatial_pool(t, 1 / 9, backend=b)),
                   # PTG has no backend argument: its "torch" reference is ST-GridPool keeping every token
                   ("pyramid_temporal_grid", lambda t, b: m.pyramid_temporal_grid(t, levels) if b == "auto"
                    else m.st_grid_pool(t, pyramid_levels=levels, keep_ratio=1.0, backend="torch"))]:
    grads = []
    for backend in ("auto", "torch"):
        leaf = x.clone().requires_grad_()
        out = pool(leaf, backend)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        grads.append(leaf.grad)
    assert not calls, name
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0, name
    torch.testing.assert_close(grads[0], grads[1])
try:
    m.st_grid_pool(x.clone().requires_grad_(), backend="triton", **kw)
except ValueError as error:
    assert "backend='triton' is invalid for frames that require grad" in str(error), error
else:
    raise AssertionError("backend='triton' with a gradient needed was not refused")
print("ok")
"""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", script, str(ROOT)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
