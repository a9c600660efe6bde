"""The authors' own ST-GridPool pooling (`prepare_unit` of their LLaVA-NeXT fork) against ours (`st_grid_pool`):
speed on the GPU and agreement of the outputs. Prints a table, writes JSON. Timings are never asserted anywhere.

    git -C ST-GridPool show HEAD:llava/model/llava_arch.py > AUTHORS/llava/model/llava_arch.py
    git -C ST-GridPool show HEAD:prepare_inputs.py > AUTHORS/prepare_inputs.py
    python benchmarks/bench_authors.py --authors-dir AUTHORS --json authors.json      # bf16, T = 16 64 256 (GPU)
    python benchmarks/bench_authors.py --authors-dir AUTHORS --smoke                  # tiny shapes on the CPU

The authors' code (github.com/bingjunluo/ST-GridPool) is read and run, never copied into this project: give the
folder holding their two files, unmodified. `prepare_unit` lives in `llava/model/llava_arch.py`, which imports the
whole LLaVA stack (vision towers, projectors, `llava.constants`, `llava.mm_utils`, `llava.utils`) at module level
but uses none of it in `prepare_unit`: `import_prepare_unit` puts placeholder modules for exactly those imports in
`sys.modules` and loads the file itself as `llava.model.llava_arch`. `prepare_unit` needs `prepare_inputs.py` from
their repo root (`create_image_grid`, `SoftmaxWeightedL2NormPool2d`), imported as is; its unused module-level
imports `loguru` and `matplotlib` get placeholders only where they are not installed.

Settings: the paper's, as their lmms-eval model sets them for Video-MME (`lmms_eval/models/llava_video.py`):
`grid_size_list=(4, 4, 4), grid_freq_list=(2, 4, 8), kernel_size=2, padding=0, temp=1, p=2`, which are our
`pyramid_levels=[(4, 2), (4, 4), (4, 8)]` (group size g, stride s), `nsp_keep_ratio=0.25` (k = 2),
`nsp_temperature=1`, `nsp_norm_p=2`, `nsp_padding=0`, `nsp_partial_windows=False`. (Their function's own default
is p=1; every configuration they ship passes p=2.)

Their function takes frames channels-first, [T, D, H, W] (their `get_2dPool` permutes LLaVA's [T, H*W, D] into
that layout and back), overwrites the summary frames of its input in place and returns [T, D, Ho, Wo]. Two timings
of theirs: `prepare_unit` alone on a [T, D, H, W] buffer, and `get_2dPool`'s whole path from [T, H*W, D] (permute,
contiguous copy, prepare_unit, permute back) against ours on the same [T, H*W, D] tensor.
"""

import argparse
import importlib.util
import inspect
import json
import math
import statistics
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks.timing
from benchmarks.timing import sync, time_runs  # noqa: E402

THEIR_SETTINGS = dict(grid_size_list=(4, 4, 4), grid_freq_list=(2, 4, 8), kernel_size=2, padding=0, temp=1, p=2)
OUR_SETTINGS = dict(
    pyramid_levels=((4, 2), (4, 4), (4, 8)),
    keep_ratio=0.25,
    temperature=1.0,
    norm_p=2.0,
    padding=0,
    partial_windows=False,
)


def _stub_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []  # a package, so submodules can hang below it
    sys.modules[name] = module
    return module


def _unavailable(name: str):
    def stub(*args, **kwargs):
        raise RuntimeError(f"{name} is a placeholder of bench_authors.py: the LLaVA stack is not imported")

    return stub


def import_prepare_unit(authors_dir: Path):
    """The authors' `prepare_unit` from AUTHORS/llava/model/llava_arch.py, with placeholders for the LLaVA-stack
    imports it does not use. Returns (function, list of the names given placeholders)."""
    authors_dir = Path(authors_dir).resolve()
    arch = authors_dir / "llava" / "model" / "llava_arch.py"
    for needed in (arch, authors_dir / "prepare_inputs.py"):
        if not needed.is_file():
            raise SystemExit(
                f"--authors-dir {authors_dir}: {needed.relative_to(authors_dir)} is missing: copy it from their repo"
            )
    stubbed = []
    for optional in ("loguru", "matplotlib"):  # imported at the top of prepare_inputs.py, used by nothing we call
        if importlib.util.find_spec(optional) is None:
            stubbed.append(optional)
            _stub_module(optional, logger=types.SimpleNamespace(info=print, warning=print, debug=print, error=print))
            if optional == "matplotlib":
                _stub_module("matplotlib.pyplot")
                _stub_module("matplotlib.patches", Rectangle=object)
    llava_stubs = {
        "llava": {},
        "llava.model": {},
        "llava.model.multimodal_encoder": {},
        "llava.model.multimodal_encoder.builder": {"build_vision_tower": _unavailable("build_vision_tower")},
        "llava.model.multimodal_resampler": {},
        "llava.model.multimodal_resampler.builder": {"build_vision_resampler": _unavailable("build_vision_resampler")},
        "llava.model.multimodal_projector": {},
        "llava.model.multimodal_projector.builder": {"build_vision_projector": _unavailable("build_vision_projector")},
        # the values of their llava/constants.py
        "llava.constants": dict(
            IGNORE_INDEX=-100,
            IMAGE_TOKEN_INDEX=-200,
            DEFAULT_IMAGE_PATCH_TOKEN="<im_patch>",
            DEFAULT_IM_START_TOKEN="<im_start>",
            DEFAULT_IM_END_TOKEN="<im_end>",
        ),
        "llava.mm_utils": {"get_anyres_image_grid_shape": _unavailable("get_anyres_image_grid_shape")},
        "llava.utils": {"rank0_print": print, "rank_print": print},
    }
    for name, attrs in llava_stubs.items():
        _stub_module(name, **attrs)
        stubbed.append(name)
    sys.path.insert(0, str(authors_dir))  # `from prepare_inputs import ...` at their module level
    spec = importlib.util.spec_from_file_location("llava.model.llava_arch", arch)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.prepare_unit, stubbed


def import_ours(project_root: Path):
    sys.path.insert(0, str(Path(project_root).resolve()))
    import modeling_stgridpool_llava as ours

    return ours


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def time_ms(fn, inputs, device, warmup=3, reps=30, budget_s=1.5) -> dict:
    """Median (and all) milliseconds of fn(x), cycling through `inputs` so that no run is served from the L2 cache.
    CUDA events on the GPU, perf_counter after a sync elsewhere."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    sync(device)
    t0 = time.perf_counter()
    fn(inputs[0])
    sync(device)
    reps = max(5, min(reps, int(budget_s / max(time.perf_counter() - t0, 1e-6))))
    times = time_runs(fn, inputs, device, reps)
    return dict(median=statistics.median(times), min=min(times), reps=reps, all=times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def max_abs(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).abs().max())


def case(prepare_unit, ours, num_frames: int, dim: int, side: int, device, dtype, do_timing: bool) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(1000 + num_frames)
    row = dict(T=num_frames, D=dim, side=side, dtype=str(dtype).replace("torch.", ""))

    def theirs_thwd(x):  # [T, H, W, D] in, [T, Ho, Wo, D] out, on a private channels-first copy
        return prepare_unit(x.permute(0, 3, 1, 2).contiguous(), **THEIR_SETTINGS).permute(0, 2, 3, 1)

    # --- agreement, on a fresh random input (tokens of varying norm, as projector outputs have) ---
    x = torch.randn(num_frames, side, side, dim, generator=gen) * (
        0.5 + torch.rand(num_frames, side, side, 1, generator=gen)
    )
    x = x.to(device)
    ref64 = theirs_thwd(x.double())  # their code in float64: the reference
    outs = {
        "ours_" + row["dtype"]: ours.st_grid_pool(x.to(dtype), **OUR_SETTINGS),
        "theirs_" + row["dtype"]: theirs_thwd(x.to(dtype)),
        "ours_float32": ours.st_grid_pool(x.float(), **OUR_SETTINGS),
        "theirs_float32": theirs_thwd(x.float()),
    }
    row["shape_ours"], row["shape_theirs"] = list(outs["ours_float32"].shape), list(outs["theirs_float32"].shape)
    errs = {f"{k}_vs_theirs_float64": dict(rel=rel_err(v, ref64), max_abs=max_abs(v, ref64)) for k, v in outs.items()}
    a, b = outs["ours_" + row["dtype"]], outs["theirs_" + row["dtype"]]
    errs[f"ours_vs_theirs_{row['dtype']}"] = dict(
        rel=rel_err(a, b), max_abs=max_abs(a, b), frac_elems_equal=float((a == b).float().mean())
    )
    row["agreement"] = errs
    row["ref_max_abs"] = float(ref64.abs().max())
    x_before = x.clone()
    ours.st_grid_pool(x, **OUR_SETTINGS)
    row["ours_leaves_input_unchanged"] = bool(torch.equal(x, x_before))
    x_cf = x.permute(0, 3, 1, 2).contiguous()
    prepare_unit(x_cf, **THEIR_SETTINGS)
    row["theirs_leaves_input_unchanged"] = bool(torch.equal(x_cf, x_before.permute(0, 3, 1, 2)))
    del ref64, outs, a, b, x_cf, x_before
    if not do_timing:
        return row

    # --- timings ---
    bytes_in = num_frames * side * side * dim * torch.finfo(dtype).bits // 8
    copies = max(2, min(4, math.ceil(256e6 / bytes_in))) if device.type == "cuda" else 1
    tokens = [(torch.randn(num_frames, side * side, dim, generator=gen)).to(device, dtype) for _ in range(copies)]
    channels_first = [t.view(num_frames, side, side, dim).permute(0, 3, 1, 2).contiguous() for t in tokens]
    ms = {}
    # prepare_unit overwrites its input's summary frames: harmless for timing (same work on any values).
    ms["theirs_prepare_unit"] = time_ms(lambda v: prepare_unit(v, **THEIR_SETTINGS), channels_first, device)
    ms["ours_st_grid_pool"] = time_ms(
        lambda v: ours.st_grid_pool(v.view(num_frames, side, side, dim), **OUR_SETTINGS), tokens, device
    )

    def their_get_2dpool(v):  # LLaVA's get_2dPool around prepare_unit: [T, H*W, D] -> [T, Ho*Wo, D]
        f = v.view(num_frames, side, side, -1).permute(0, 3, 1, 2).contiguous()
        return prepare_unit(f, **THEIR_SETTINGS).permute(0, 2, 3, 1).reshape(num_frames, -1, dim)

    def our_tokens(v):
        return ours.st_grid_pool(v.view(num_frames, side, side, dim), **OUR_SETTINGS).reshape(num_frames, -1, dim)

    ms["theirs_get_2dPool_path"] = time_ms(their_get_2dpool, tokens, device)
    ms["ours_tokens_path"] = time_ms(our_tokens, tokens, device)
    ms["ours_st_grid_pool_again"] = time_ms(
        lambda v: ours.st_grid_pool(v.view(num_frames, side, side, dim), **OUR_SETTINGS), tokens, device
    )  # run-to-run spread
    out_copy = torch.empty_like(tokens[0])
    ms["copy_input"] = time_ms(lambda v: out_copy.copy_(v), tokens, device)
    row["ms"] = ms
    row["speedup_prepare_unit"] = ms["theirs_prepare_unit"]["median"] / ms["ours_st_grid_pool"]["median"]
    row["speedup_get_2dPool_path"] = ms["theirs_get_2dPool_path"]["median"] / ms["ours_tokens_path"]["median"]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--authors-dir", required=True, type=Path, help="holds llava/model/llava_arch.py and prepare_inputs.py"
    )
    parser.add_argument(
        "--project-root", type=Path, default=ROOT, help="where modeling_stgridpool_llava.py is (default: this repo)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--dim", type=int, default=3584)
    parser.add_argument("--side", type=int, default=27)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.frames, args.dim, args.side = "cpu", [8, 16], 16, 7
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    prepare_unit, stubbed = import_prepare_unit(args.authors_dir)
    ours = import_ours(args.project_root)
    import transformers

    env = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton_version(),
        command=" ".join([sys.executable] + sys.argv),
        dtype=str(dtype),
        ours_module=ours.__file__,
        theirs_module=inspect.getsourcefile(prepare_unit),
        placeholders=stubbed,
        their_settings=THEIR_SETTINGS,
        our_settings=OUR_SETTINGS,
    )
    try:
        import subprocess

        env["project_commit"] = (
            subprocess.run(
                ["git", "-C", str(args.project_root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
            ).stdout.strip()
            or None
        )
    except OSError:
        env["project_commit"] = None
    print(json.dumps(env), flush=True)
    results = dict(env=env, rows=[])
    with torch.inference_mode():
        for num_frames in args.frames:
            row = case(prepare_unit, ours, num_frames, args.dim, args.side, device, dtype, do_timing=True)
            results["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "ms"}), flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    d = results["rows"][0]["dtype"] if results["rows"] else ""
    print(
        "\n| T | theirs prepare_unit ms | ours st_grid_pool ms | x | theirs get_2dPool path ms | ours tokens path ms "
        f"| x | ours again ms | copy ms | rel err ours vs theirs ({d}) | ours {d} vs theirs f64 "
        f"| theirs {d} vs theirs f64 |"
    )
    print("|" + "---:|" * 12)
    for r in results["rows"]:
        ms, e = {k: v["median"] for k, v in r["ms"].items()}, r["agreement"]
        cells = [
            r["T"], f"{ms['theirs_prepare_unit']:.3f}", f"{ms['ours_st_grid_pool']:.3f}",
            f"{r['speedup_prepare_unit']:.1f}", f"{ms['theirs_get_2dPool_path']:.3f}", f"{ms['ours_tokens_path']:.3f}",
            f"{r['speedup_get_2dPool_path']:.1f}",
            f"{ms['ours_st_grid_pool_again']:.3f}", f"{ms['copy_input']:.3f}", f"{e[f'ours_vs_theirs_{d}']['rel']:.1e}",
            f"{e[f'ours_{d}_vs_theirs_float64']['rel']:.1e}", f"{e[f'theirs_{d}_vs_theirs_float64']['rel']:.1e}",
        ]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
