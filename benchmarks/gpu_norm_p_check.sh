# The GPU check recorded in RESULTS.md ("The general p-norm on the GPU"): run from the repository root on a CUDA
# machine; pytest and hypothesis are installed from a carried wheel folder where missing.
set -x
python3 -c "import pytest" 2>/dev/null || pip install -q --no-index --find-links .gpu/wheels_pytest pytest hypothesis
nvidia-smi --query-gpu=name --format=csv,noheader
python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
HF_HUB_OFFLINE=1 python3 -m pytest -q -p no:cacheprovider tests/test_modeling_stgridpool_llava.py tests/test_stgridpool_triton.py 2>&1 | grep -v "^  \s*$" | tail -60
python3 - <<'PY'
import torch, sys
sys.path.insert(0, ".")
import modeling_stgridpool_llava as m
x = torch.randn(64, 27, 27, 3584, device="cuda", dtype=torch.bfloat16)
for kr in (0.25, 1/9):
    for p in (2.0, 3.0):
        f = lambda: m.st_grid_pool(x, pyramid_levels=((4, 2), (4, 4), (4, 8)), keep_ratio=kr, norm_p=p, backend="triton")
        for _ in range(3): f()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        ts = []
        for _ in range(20):
            s.record(); f(); e.record(); e.synchronize(); ts.append(s.elapsed_time(e))
        ts.sort(); print(f"st_grid_pool bf16 [64,27,27,3584] keep_ratio={kr:.4f} norm_p={p}: median {ts[10]:.3f} ms")
PY
