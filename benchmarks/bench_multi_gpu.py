"""A 7B-shaped random-weight ST-GridPool checkpoint on one GPU and spread over several with `device_map="auto"`
(issue 14): greedy `generate` on one 64-frame video must give the same tokens; time to first token and peak memory
per card, next to the one-card run. The weights are built on the GPU machine (never carried) and saved once, so
both placements load the same checkpoint. Writes JSON; timings are never asserted anywhere.

    python benchmarks/bench_multi_gpu.py --work /dev/shm/mg --json multi_gpu.json      # needs >= 2 GPUs
    python benchmarks/bench_multi_gpu.py --work /tmp/mg --smoke        # tiny shapes, CPU: the script runs

The spread placement is `device_map="auto"` with `max_memory` capping card 0 (default 8 GiB), so that the vision
tower, the projector and the first decoder layers sit on card 0 and the rest on the other card(s). Where the video
is pooled is recorded by wrapping `pool_video` and `add_video_newlines` of the model module.
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import modeling_stgridpool_llava as ours  # noqa: E402
from benchmarks.bench_pooling import build_7b_config  # noqa: E402

CALLS = []  # (function, input device, extra device) of the model's video pooling calls


def _record(name, fn):
    def wrapper(frames, *args, **kwargs):
        other = args[0] if args and isinstance(args[0], torch.Tensor) else None
        out = fn(frames, *args, **kwargs)
        CALLS.append(
            dict(
                fn=name,
                input=str(frames.device),
                output=str(out.device),
                **({"newline": str(other.device)} if other is not None else {}),
            )
        )
        return out

    return wrapper


ours.pool_video = _record("pool_video", ours.pool_video)
ours.add_video_newlines = _record("add_video_newlines", ours.add_video_newlines)


def smoke_config():
    from configuration_stgridpool import STGridPoolConfig

    return STGridPoolConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, image_size=54, patch_size=2, vision_use_head=False),
        text_config=dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=1000, max_position_embeddings=65536),
        vision_feature_layer=-1, vision_feature_select_strategy="full", image_token_index=998, video_token_index=999,
    )  # fmt: skip


def devices_of(model) -> list:
    return sorted({p.device for p in model.parameters()}, key=str)


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def sync_all():
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def memory(reset=False) -> list:
    out = []
    for i in range(torch.cuda.device_count()):
        out.append(
            dict(
                allocated_gib=torch.cuda.memory_allocated(i) / 2**30,
                peak_gib=torch.cuda.max_memory_allocated(i) / 2**30,
            )
        )
        if reset:
            torch.cuda.reset_peak_memory_stats(i)
    return out


def measure(model, inputs: dict, new_tokens: int, reps: int, on_gpu: bool) -> dict:
    """TTFT (video features + prefill, last position's logits), its peak memory per card, greedy generate."""
    placement = {}
    hf_map = getattr(model, "hf_device_map", None) or {"": str(devices_of(model)[0])}
    for name, device in hf_map.items():
        placement.setdefault(str(device), []).append(name)
    params_per_device = {}
    for p in model.parameters():
        params_per_device[str(p.device)] = (
            params_per_device.get(str(p.device), 0) + p.numel() * p.element_size() / 2**30
        )
    res = dict(
        first_device=str(model.device),
        weights_gib_per_device=params_per_device,
        modules_per_device={
            d: (names if len(names) <= 8 else names[:4] + ["..."] + names[-3:]) for d, names in placement.items()
        },
    )

    def ttft():
        out = model(**inputs, logits_to_keep=1, use_cache=True)
        return out.logits[:, -1].float()

    with torch.inference_mode():
        logits = ttft()  # warm-up (Triton compile, cuBLAS handles)
        if on_gpu:
            sync_all()
            torch.cuda.empty_cache()
            res["memory_before_ttft"] = memory(reset=True)
        CALLS.clear()
        logits = ttft()
        res["pool_calls"] = list(CALLS)
        if on_gpu:
            sync_all()
            res["memory_ttft"] = memory()
        times = []
        for _ in range(reps):
            if on_gpu:
                sync_all()
            t0 = time.perf_counter()
            ttft()
            if on_gpu:
                sync_all()
            times.append((time.perf_counter() - t0) * 1e3)
        res["ttft_ms"], res["ttft_ms_all"] = statistics.median(times), times
        if on_gpu:
            torch.cuda.empty_cache()
            memory(reset=True)
        t0 = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
        if on_gpu:
            sync_all()
            res["memory_generate"] = memory()
        res["generate_ms"] = (time.perf_counter() - t0) * 1e3
        res["new_tokens"] = out[0, inputs["input_ids"].shape[1] :].tolist()
    res["first_logits"] = logits.cpu()
    return res


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, type=Path, help="where the checkpoint is written (deleted at the end)")
    parser.add_argument("--frames", type=int, default=None, help="video frames (default 64; 8 with --smoke)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--card0-cap", default="8GiB", help="max_memory of card 0 in the spread run")
    parser.add_argument("--other-cap", default="70GiB", help="max_memory of each other card in the spread run")
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script runs")
    parser.add_argument("--keep", action="store_true", help="keep the saved checkpoint")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    on_gpu = not args.smoke
    args.frames = args.frames or (8 if args.smoke else 64)
    if on_gpu and torch.cuda.device_count() < 2:
        raise SystemExit(f"needs at least 2 GPUs, found {torch.cuda.device_count()}")
    import transformers

    env = dict(
        command=" ".join([sys.executable] + sys.argv),
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=triton_version(),
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        frames=args.frames,
    )
    print(json.dumps(env), flush=True)
    results = dict(env=env)
    config = smoke_config() if args.smoke else build_7b_config()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    ckpt = args.work / "ckpt"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda:0" if on_gpu else "cpu"):
        model = ours.STGridPoolLlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
    model.save_pretrained(ckpt)
    del model
    if on_gpu:
        torch.cuda.empty_cache()
    results["build_and_save_s"] = time.perf_counter() - t0
    results["checkpoint_gib"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors")) / 2**30

    gen = torch.Generator().manual_seed(1)
    side = config.vision_config.image_size
    pixels = torch.randn(1, args.frames, 3, side, side, generator=gen).to(dtype)
    text = torch.randint(1000 if on_gpu else 100, 100000 if on_gpu else 900, (60,), generator=gen)
    num_video_tokens = config.video_pooling.num_tokens(args.frames, config.frame_size, config.frame_size)
    ids = torch.cat([text[:30], torch.full((num_video_tokens,), config.video_token_id), text[30:]])[None]
    results["prompt_tokens"] = int(ids.shape[1])

    placements = {"one_card": {"": 0} if on_gpu else None}
    if on_gpu:
        caps = {0: args.card0_cap, **{i: args.other_cap for i in range(1, torch.cuda.device_count())}}
        placements["auto_split"] = dict(device_map="auto", max_memory=caps)
    runs = {}
    for name, placement in placements.items():
        kwargs = {"dtype": dtype}
        if isinstance(placement, dict) and "device_map" in placement:
            kwargs.update(placement)
        elif placement is not None:
            kwargs["device_map"] = placement
        t0 = time.perf_counter()
        model = ours.STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(ckpt, **kwargs).eval()
        load_s = time.perf_counter() - t0
        inputs = dict(
            input_ids=ids.to(model.device),
            attention_mask=torch.ones_like(ids).to(model.device),
            pixel_values_videos=pixels.to(model.device),
        )
        res = measure(model, inputs, args.new_tokens, args.reps, on_gpu)
        res["load_s"], res["load_kwargs"] = load_s, {k: str(v) for k, v in kwargs.items()}
        runs[name] = res
        if args.json:  # what is done so far, in case a later placement fails
            done = {k: {m: v for m, v in r.items() if m != "first_logits"} for k, r in runs.items()}
            args.json.write_text(json.dumps({**results, "runs": done}, indent=1))
        print(name, json.dumps({k: v for k, v in res.items() if k not in ("first_logits", "ttft_ms_all")}), flush=True)
        del model, inputs
        if on_gpu:
            torch.cuda.empty_cache()
    if len(runs) == 2:
        a, b = runs["one_card"], runs["auto_split"]
        results["same_tokens"] = a["new_tokens"] == b["new_tokens"]
        results["first_logits_max_abs_diff"] = float((a["first_logits"] - b["first_logits"]).abs().max())
        results["first_logits_bit_identical"] = bool(torch.equal(a["first_logits"], b["first_logits"]))
    for r in runs.values():
        r.pop("first_logits")
    results["runs"] = runs
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if on_gpu:
        n = torch.cuda.device_count()
        print(
            "\n| placement | weights GiB per card | TTFT ms | peak GiB per card (TTFT) | peak GiB per card (generate) "
            "| pooling ran on |\n|---|---|---:|---|---|---|"
        )
        for name, r in runs.items():
            w = " / ".join(f"{r['weights_gib_per_device'].get(f'cuda:{i}', 0):.2f}" for i in range(n))
            pt = " / ".join(f"{m['peak_gib']:.2f}" for m in r["memory_ttft"])
            pg = " / ".join(f"{m['peak_gib']:.2f}" for m in r["memory_generate"])
            pool = sorted({c["input"] for c in r["pool_calls"] if c["fn"] == "pool_video"})
            print(f"| {name} | {w} | {r['ttft_ms']:.1f} | {pt} | {pg} | {pool} |")
    print(
        f"\nsame tokens: {results.get('same_tokens')}; first-step logits bit-identical: "
        f"{results.get('first_logits_bit_identical')} (max abs diff {results.get('first_logits_max_abs_diff')})"
    )
    return 0 if results.get("same_tokens", True) else 1


if __name__ == "__main__":
    sys.exit(main())
