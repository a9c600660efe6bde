"""Benchmark ST-GridPool's video pooling against stock LLaVA-OneVision pooling, a loop rewrite of ours
(benchmarks/loop_impl.py, the "reference" column; not the authors' code: benchmarks/bench_authors.py runs theirs), the
plain vectorized reading of SPEC.md and a device copy of the same bytes; optionally end to end on a 7B-shaped
random-weight model (GPU). Prints a table, writes JSON. Timings are never asserted anywhere.

    python benchmarks/bench_pooling.py                     # full sweep on the default device (cuda if present)
    python benchmarks/bench_pooling.py --e2e --generate    # + time to first token and generate, 7B shapes (GPU)
    python benchmarks/bench_pooling.py --smoke             # tiny shapes on the CPU, seconds (CI)
"""

import argparse
import functools
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modeling_stgridpool_llava as ours  # noqa: E402
import stgridpool_triton as kernels  # noqa: E402
from benchmarks import loop_impl, plain_impl  # noqa: E402
from benchmarks.timing import sync, time_runs  # noqa: E402

LEVELS = ((4, 2), (4, 4), (4, 8))
NSP = dict(keep_ratio=0.25, temperature=1.0, norm_p=2.0, padding=0, partial_windows=False)


def stock_apply_pooling(features: torch.Tensor, side: int) -> torch.Tensor:
    """transformers' LlavaOnevisionModel.apply_pooling, verbatim: [N, side*side, D] -> [N, Ho*Wo, D]."""
    batch_frames, seq_len, dim = features.shape
    features = features.view(batch_frames, side, side, -1)
    features = features.permute(0, 3, 1, 2).contiguous()
    height, width = features.shape[2:]
    scaled_shape = [math.ceil(height / 2), math.ceil(width / 2)]
    features = F.interpolate(features, size=scaled_shape, mode="bilinear")
    features = features.permute(0, 2, 3, 1)
    return features.view(batch_frames, -1, dim)


def stock_average_pooling(features: torch.Tensor, side: int) -> torch.Tensor:
    """LLaVA-Video's 2x2 average pooling in the stock layout (NCHW, contiguous): [N, side*side, D] -> [N, Ho*Wo, D]."""
    n, _, dim = features.shape
    x = features.view(n, side, side, dim).permute(0, 3, 1, 2).contiguous()
    return F.avg_pool2d(x, 2, 2).permute(0, 2, 3, 1).reshape(n, -1, dim)


def time_fn(fn, inputs, device, budget_s=0.6, min_reps=3, max_reps=50) -> float:
    """Median milliseconds of fn(x), cycling through `inputs` (several buffers: repeated runs must not be served
    from cache). Device events on CUDA, perf_counter (after a sync) elsewhere. One warm-up call per input first."""
    for x in inputs[:2]:
        fn(x)
    sync(device)
    t0 = time.perf_counter()
    fn(inputs[0])
    sync(device)
    once = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, int(budget_s / max(once, 1e-6))))
    return statistics.median(time_runs(fn, inputs, device, reps))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if out.shape != ref.shape:
        return float("inf")
    return float((out - ref).norm() / ref.norm())


def bench_case(num_frames, dim, side, device, dtype, with_reference=True, with_cpu_check=False) -> dict:
    """All pooling variants on one [T, side, side, D] video."""
    gen = torch.Generator(device="cpu").manual_seed(num_frames * 7919 + dim)
    bytes_in = num_frames * side * side * dim * torch.finfo(dtype).bits // 8
    # Enough distinct buffers that the timed loop streams from device memory, not the 50 MB L2.
    copies = max(1, min(4, math.ceil(256e6 / bytes_in))) if device.type == "cuda" else 1
    inputs = []
    for _ in range(copies):
        x = torch.randn(num_frames, side, side, dim, generator=gen) * (
            0.5 + torch.rand(num_frames, side, side, 1, generator=gen)
        )
        inputs.append(x.to(device, dtype))
    flat = [x.reshape(num_frames, side * side, dim) for x in inputs]
    row = dict(T=num_frames, D=dim, side=side, bytes_in=bytes_in, dtype=str(dtype).replace("torch.", ""))
    kw = dict(pyramid_levels=LEVELS, **NSP)
    x0 = inputs[0]

    # --- correctness (fresh random input, float64 reference through the independent plain implementation) ---
    ref64 = plain_impl.st_grid_pool(x0.double(), **kw)
    fast = ours.st_grid_pool(x0, **kw)
    row["backend"] = ours.nsp_backend(x0)
    row["err_stgridpool_vs_f64"] = rel_err(fast, ref64)
    row["err_stgridpool_torch_vs_f64"] = rel_err(ours.st_grid_pool(x0, backend="torch", **kw), ref64)
    row["input_unchanged"] = True
    if with_cpu_check:  # the CPU float32 path, as SPEC.md's users run it
        cpu32 = ours.st_grid_pool(x0.float().cpu(), backend="torch", **kw)
        row["err_stgridpool_vs_cpu_f32"] = rel_err(fast, cpu32)
        row["maxabs_stgridpool_vs_cpu_f32"] = float((fast.double().cpu() - cpu32.double()).abs().max())
        del cpu32
    del ref64
    stock = stock_apply_pooling(flat[0], side)
    row["bilinear_bit_identical"] = bool(torch.equal(ours.bilinear_pool(x0).reshape(stock.shape), stock))
    row["err_bilinear_vs_stock"] = rel_err(ours.bilinear_pool(x0).reshape(stock.shape), stock)
    stock_avg = stock_average_pooling(flat[0], side)
    row["average_bit_identical"] = bool(torch.equal(ours.average_pool(x0).reshape(stock_avg.shape), stock_avg))
    row["err_average_vs_stock"] = rel_err(ours.average_pool(x0).reshape(stock_avg.shape), stock_avg)
    del stock, stock_avg

    # --- timings (ms) ---
    out_copy = torch.empty_like(x0)
    t = {}
    t["copy"] = time_fn(lambda x: out_copy.copy_(x), inputs, device)
    t["stock_apply_pooling"] = time_fn(
        lambda x: stock_apply_pooling(x.view(num_frames, -1, dim), side), inputs, device, budget_s=0.3
    )
    t["stock_average_layout"] = time_fn(
        lambda x: stock_average_pooling(x.view(num_frames, -1, dim), side), inputs, device, budget_s=0.3
    )
    t["ours_bilinear"] = time_fn(ours.bilinear_pool, inputs, device)
    t["ours_average"] = time_fn(ours.average_pool, inputs, device)
    t["ours_stgridpool"] = time_fn(lambda x: ours.st_grid_pool(x, **kw), inputs, device)
    if row["backend"] != "torch":
        t["ours_stgridpool_torch_path"] = time_fn(lambda x: ours.st_grid_pool(x, backend="torch", **kw), inputs, device)
    t["plain"] = time_fn(lambda x: plain_impl.st_grid_pool(x, **kw), inputs, device)
    if with_reference:
        t["reference"] = time_fn(lambda x: loop_impl.loop_st_grid_pool(x, **kw), inputs, device, budget_s=0.3)
    before = [x.clone() for x in inputs[:1]]
    ours.st_grid_pool(inputs[0], **kw)
    row["input_unchanged"] = bool(torch.equal(before[0], inputs[0]))
    if device.type == "cuda":  # any host-device synchronisation inside the (warm) video path raises here
        try:
            torch.cuda.set_sync_debug_mode("error")
            ours.st_grid_pool(inputs[0], **kw)
            ours.bilinear_pool(inputs[0])
            ours.average_pool(inputs[0])
            row["no_sync"] = True
        except RuntimeError as exc:
            row["no_sync"] = f"sync: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    row["ms"] = t
    out_bytes = num_frames * 13 * 13 * dim * torch.finfo(dtype).bits // 8
    row["floor_ms_at_copy_bw"] = (bytes_in + out_bytes) / (2 * bytes_in / (t["copy"] * 1e-3)) * 1e3
    return row


def config_checks(device, dtype) -> list:
    """The fused path on non-default settings (padding, partial windows, other p, k = 3, other pyramids, odd sizes)
    against the float64 plain implementation, fresh random inputs each."""
    gen = torch.Generator(device="cpu").manual_seed(1234)
    configs = [
        dict(
            T=13,
            H=27,
            W=27,
            D=896,
            levels=((4, 2), (4, 4), (4, 8)),
            keep_ratio=0.25,
            temperature=1.0,
            norm_p=2.0,
            padding=0,
            partial_windows=True,
        ),
        dict(
            T=17,
            H=13,
            W=11,
            D=1000,
            levels=((3, 2), (2, 3), (1, 1)),
            keep_ratio=1 / 9,
            temperature=0.5,
            norm_p=1.0,
            padding=1,
            partial_windows=True,
        ),
        dict(
            T=9,
            H=27,
            W=27,
            D=3584,
            levels=((6, 1),),
            keep_ratio=0.25,
            temperature=2.0,
            norm_p=3.0,
            padding=0,
            partial_windows=False,
        ),
        dict(
            T=32,
            H=27,
            W=27,
            D=3584,
            levels=((4, 2), (4, 4)),
            keep_ratio=1 / 16,
            temperature=1.0,
            norm_p=2.0,
            padding=2,
            partial_windows=False,
        ),
        dict(
            T=8,
            H=6,
            W=6,
            D=64,
            levels=((4, 2),),
            keep_ratio=1.0,
            temperature=1.0,
            norm_p=2.0,
            padding=0,
            partial_windows=False,
        ),
    ]
    out = []
    for c in configs:
        x = torch.randn(c["T"], c["H"], c["W"], c["D"], generator=gen) * (
            0.5 + torch.rand(c["T"], c["H"], c["W"], 1, generator=gen)
        )
        x = x.to(device, dtype)
        kw = dict(
            pyramid_levels=c["levels"],
            keep_ratio=c["keep_ratio"],
            temperature=c["temperature"],
            norm_p=c["norm_p"],
            padding=c["padding"],
            partial_windows=c["partial_windows"],
        )
        ref = plain_impl.st_grid_pool(x.double(), **kw)
        got = ours.st_grid_pool(x, **kw)
        ptg = rel_err(
            ours.pyramid_temporal_grid(x, c["levels"]), plain_impl.pyramid_temporal_grid(x.double(), c["levels"])
        )
        out.append(
            dict(
                config={k: v for k, v in c.items()},
                backend=ours.nsp_backend(x, c["norm_p"]),
                err_vs_f64=rel_err(got, ref),
                ptg_err_vs_f64=ptg,
                finite=bool(torch.isfinite(got).all()),
            )
        )
    return out


def nsp_variants(device, dtype, num_frames=64, dim=3584, side=27) -> dict:
    """Milliseconds of the fused NSP kernel alone, one-pass (window in registers) vs two-pass, and of PTG alone."""
    x = torch.randn(num_frames, side, side, dim, device=device).to(dtype)
    entries = torch.stack(
        [torch.zeros(num_frames, dtype=torch.long, device=device)] + [torch.arange(num_frames, device=device)] * 2, 1
    )
    out = torch.empty(num_frames, 13, 13, dim, device=device, dtype=dtype)
    res = {}
    for one_pass in (True, False):
        res[f"nsp_one_pass={one_pass}"] = time_fn(
            lambda v: kernels._nsp_triton(v, v, entries, out, 2, 1.0, 2.0, 0, one_pass=one_pass), [x], device
        )
    plan, maps = ours._plan_and_maps(x, LEVELS)
    res["ptg_bank_triton"] = time_fn(lambda v: kernels.ptg_bank(v, plan, LEVELS), [x], device)
    res["ptg_bank_torch"] = time_fn(lambda v: ours._ptg_bank_torch(v, plan, maps), [x], device)
    res["nsp_torch"] = time_fn(lambda v: ours._nsp_torch(v, 2, 13, 13, 1.0, 2.0, 0), [x], device)
    return res


def build_7b_config(ours_mode="stgridpool"):
    from configuration_stgridpool import STGridPoolConfig

    return STGridPoolConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
            num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
            num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        ),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=151646,
        video_token_index=151647, video_pooling_mode=ours_mode,
    )  # fmt: skip


def end_to_end(num_frames: int, device: torch.device, reps: int, generate: bool, new_tokens: int) -> dict:
    """Time to first token (video features + prefill, logits of the last position only, as generate does) of ours
    vs stock LlavaOnevisionForConditionalGeneration on the same bf16 random weights (one module, class swapped)."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel

    config = build_7b_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = ours.STGridPoolLlavaOnevisionForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval()
    sync(device)
    result = dict(build_s=time.perf_counter() - t0, params_b=sum(p.numel() for p in model.parameters()) / 1e9)
    side = config.frame_size
    pixels = torch.randn(1, num_frames, 3, 384, 384, device=device, dtype=torch.bfloat16)
    text = torch.randint(1000, 100000, (60,), device=device)

    def prompt(tokens_per_frame):
        video = torch.full((num_frames * tokens_per_frame + 1,), config.video_token_id, device=device)
        return torch.cat([text[:30], video, text[30:]])[None]

    ids = {"ours": prompt(13 * 13), "stock": prompt(math.ceil(side / 2) ** 2)}
    classes = {
        "ours": (ours.STGridPoolLlavaOnevisionForConditionalGeneration, ours.STGridPoolLlavaOnevisionModel),
        "stock": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel),
    }

    def use(name):
        model.__class__, model.model.__class__ = classes[name]

    def ttft(name):
        out = model(
            input_ids=ids[name],
            pixel_values_videos=pixels,
            attention_mask=torch.ones_like(ids[name]),
            logits_to_keep=1,
            use_cache=True,
        )
        return out.logits[:, -1].argmax(-1)

    def features(name):
        return model.model.get_video_features(pixels)

    result["tokens"] = {k: int(v.shape[1]) for k, v in ids.items()}
    times = {f"{n}_{what}": [] for n in ids for what in ("ttft", "features")}
    peaks = {}
    with torch.inference_mode():
        for name in ("ours", "stock"):  # warm-up; peak memory of one TTFT each, from the same baseline
            use(name)
            ttft(name)
            sync(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            ttft(name)
            sync(device)
            peaks[name] = dict(
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30,
                above_weights_gib=(torch.cuda.max_memory_allocated(device) - base) / 2**30,
            )
        for _ in range(reps):  # interleaved so drift hits both alike
            for name in ("ours", "stock"):
                use(name)
                for what, fn in (("ttft", ttft), ("features", features)):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(name)
                    end.record()
                    end.synchronize()
                    times[f"{name}_{what}"].append(start.elapsed_time(end))
        result["ms"] = {k: statistics.median(v) for k, v in times.items()}
        result["ms_all"] = times
        result["peak_memory"] = peaks
        result["ttft_speedup"] = result["ms"]["stock_ttft"] / result["ms"]["ours_ttft"]
        if generate:  # issue 8: one GPU, greedy generate on the 64-frame video
            gen = {}
            for name in ("ours", "stock"):
                use(name)
                kwargs = dict(
                    input_ids=ids[name],
                    pixel_values_videos=pixels,
                    attention_mask=torch.ones_like(ids[name]),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
                model.generate(**kwargs)  # warm-up
                runs = []
                for _ in range(3):
                    sync(device)
                    t0 = time.perf_counter()
                    out = model.generate(**kwargs)
                    sync(device)
                    runs.append((time.perf_counter() - t0) * 1e3)
                gen[name] = dict(
                    ms=statistics.median(runs), runs_ms=runs, new_tokens=int(out.shape[1] - ids[name].shape[1])
                )
            result["generate"] = gen
    use("ours")
    model = None  # frees the weights before the caller goes on (the closures above hold the name)
    torch.cuda.empty_cache()
    return result


def compile_check(device, dtype, num_frames, dim, side) -> dict:
    """torch.compile(fullgraph=True) of st_grid_pool (the PyTorch path, which Inductor fuses): compiles with no
    graph break, agrees with eager, and its time."""
    kw = dict(pyramid_levels=LEVELS, **NSP)
    fn = torch.compile(functools.partial(ours.st_grid_pool, **kw), fullgraph=True, dynamic=False)
    x = torch.randn(num_frames, side, side, dim, device=device).to(dtype)
    t0 = time.perf_counter()
    out = fn(x)
    sync(device)
    res = dict(compile_s=time.perf_counter() - t0, err_vs_eager=rel_err(out, ours.st_grid_pool(x, **kw)))
    res["ms"] = time_fn(fn, [x, x.clone()], device)
    return res


def print_table(rows, e2e, comp) -> None:
    cols = [
        "copy",
        "stock_apply_pooling",
        "ours_bilinear",
        "ours_average",
        "reference",
        "plain",
        "ours_stgridpool_torch_path",
        "ours_stgridpool",
    ]
    print(
        "\n| T | D | "
        + " | ".join(cols)
        + " | st/copy | ref/st | stock/bilin | stock/avg | err st vs f64 | bilinear bit-identical |"
    )
    print("|" + "---|" * (len(cols) + 8))
    for r in rows:
        ms = r["ms"]
        cells = [f"{ms[c]:.3f}" if c in ms else "-" for c in cols]
        st = ms["ours_stgridpool"]
        ratios = [
            st / ms["copy"],
            ms.get("reference", float("nan")) / st,
            ms["stock_apply_pooling"] / ms["ours_bilinear"],
            ms["stock_apply_pooling"] / ms["ours_average"],
        ]
        print(
            f"| {r['T']} | {r['D']} | "
            + " | ".join(cells)
            + " | "
            + " | ".join(f"{v:.1f}" for v in ratios)
            + f" | {r['err_stgridpool_vs_f64']:.1e} | {r['bilinear_bit_identical']} |"
        )
    if comp:
        print("\ncompile:", json.dumps(comp))
    if e2e:
        print("\nend to end:", json.dumps({k: v for k, v in e2e.items() if k != "ms_all"}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the script runs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    parser.add_argument("--frames", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512])
    parser.add_argument("--dims", type=int, nargs="+", default=[896, 3584])
    parser.add_argument("--side", type=int, default=27)
    parser.add_argument("--no-reference", action="store_true")
    parser.add_argument(
        "--cpu-check", action="store_true", help="also compare with the CPU float32 path (T*D <= 64*3584)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) check and timing")
    parser.add_argument("--e2e", action="store_true", help="7B-shaped model, time to first token (GPU)")
    parser.add_argument("--generate", action="store_true", help="with --e2e: also time greedy generate")
    parser.add_argument("--e2e-frames", type=int, default=64)
    parser.add_argument("--e2e-reps", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--json", default=None, help="where to write the results (default: print only)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.frames, args.dims, args.side = "cpu", [5, 16], [8], 7
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = dict(
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        argv=sys.argv,
        dtype=str(dtype),
    )
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    env["triton"] = getattr(kernels.triton, "__version__", None)
    results = dict(env=env, rows=[], errors=[])

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))

    for dim in args.dims:
        for num_frames in args.frames:
            try:
                check = args.cpu_check and num_frames * dim <= 64 * 3584
                row = bench_case(num_frames, dim, args.side, device, dtype, not args.no_reference, check or args.smoke)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
            except Exception:  # keep the rest of the sweep
                results["errors"].append(traceback.format_exc())
                print(traceback.format_exc(), flush=True)
            save()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if device.type == "cuda" and kernels.triton is not None:
        for name, fn in (
            ("config_checks", lambda: config_checks(device, dtype)),
            ("nsp_variants", lambda: nsp_variants(device, dtype)),
        ):
            try:
                results[name] = fn()
                print(name, json.dumps(results[name]), flush=True)
            except Exception:
                results["errors"].append(traceback.format_exc())
                print(traceback.format_exc(), flush=True)
            save()
    comp = None
    if args.compile:
        try:
            comp = compile_check(device, dtype, 64 if not args.smoke else 8, 3584 if not args.smoke else 8, args.side)
            results["compile"] = comp
        except Exception:
            results["errors"].append(traceback.format_exc())
            print(traceback.format_exc(), flush=True)
        save()
    e2e = None
    if args.e2e and device.type == "cuda":
        try:
            e2e = end_to_end(args.e2e_frames, device, args.e2e_reps, args.generate, args.new_tokens)
            results["e2e"] = e2e
        except Exception:
            results["errors"].append(traceback.format_exc())
            print(traceback.format_exc(), flush=True)
        save()
    print_table(results["rows"], e2e, comp)
    if results["errors"]:
        print(f"{len(results['errors'])} error(s); see above")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
