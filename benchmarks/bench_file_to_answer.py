"""From a video file to the first token, and evaluation throughput (issue 25): ours and stock in one run.

File to first token: one 5-minute 1280x720 h264 clip (25 fps, keyframes every 250 frames, B-frames, camera-like
content: benchmarks/bench_decode.py's), 64 frames, a 7B-shaped random-weight model (Qwen2-7B-shaped language model,
SigLIP-so400m-shaped tower, bf16, one GPU; `bench_pooling.build_7b_config`), the prompt one video and a question:
- `ours`: `read_video_pyav` -> `STGridPoolProcessor` on the model's GPU (`stgridpool.prompt.processor_device`) ->
  the ST-GridPool model. `ours_cpu_processor`: the same with the processor on the CPU.
- `ours_overlap`: `stgridpool.streaming.encode_video_while_decoding`: the vision tower and projector encode frames, 16
  at a time, while `read_video_pyav` decodes the rest in a background thread (the processor on the GPU, chunk by
  chunk), then the pooling; the first forward takes the features as `mm_encoder_outputs`, its prompt's ids made from
  the frame count (`stgridpool.prompt.video_question_text_inputs`). Its decode_s is the time until the features are
  there (decoding, processor, tower, pooling), its processor_s 0; `same_token_as_ours` says whether its first token
  is the `ours` path's.
- `stock`: `transformers.video_utils.load_video(backend="pyav")` -> `LlavaOnevisionProcessor` on the CPU (stock's
  default) -> `LlavaOnevisionForConditionalGeneration` on the same weights (the model's classes swapped).
First token = the forward pass generate makes first (the last position's logits) and its argmax on the host. Each
path runs whole, `--reps` times, the four interleaved; stage times and the whole are medians.

Evaluation throughput: the lmms-eval model class (`STGridPoolLMM`, loading the checkpoint saved here) over a mixed
set of synthetic 720p clips (30 s to 10 min, one request each), `generate_until` (greedy, `--new-tokens`) and
`loglikelihood`, with `prefetch=0` (one request after the other) and `prefetch=2`: videos per hour, and whether the
answers are identical. `--sdpa-backend` is the lmms-eval model's `sdpa_backend` (one PyTorch attention kernel).

Attention (`--attn sdpa,flash_attention_4`): each implementation after the first against the first, on random
pixels: greedy tokens, first-token logits, TTFT, peak memory, and a left-padded batch of two against each alone.

    python -m benchmarks.bench_file_to_answer --work /dev/shm/fta --json $OUT/file_to_answer.json
    python -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only attn --attn sdpa,flash_attention_4
    python -m benchmarks.bench_file_to_answer --work /dev/shm/fta --only eval --sdpa-backend flash
    python -m benchmarks.bench_file_to_answer --smoke --work /tmp/fta --attn sdpa,eager   # tiny, CPU: CI

Clips and the checkpoint are written under `--work` (never in the repository). No timing is asserted anywhere.
"""

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (seconds, height, width, frames sampled) of the file-to-first-token clip; the evaluation clips' seconds
FULL = dict(clip=(300, 720, 1280), frames=64, eval_seconds=(30, 600, 60, 300, 120, 540, 90, 240, 180, 420), tile=30)
SMOKE = dict(clip=(8, 48, 64), frames=8, eval_seconds=(2, 6, 4, 2), tile=2)
QUESTION = "what is happening in this video ?"
SECTIONS = ("ftft", "eval", "attn")


def build_config(tokenizer, smoke: bool):
    """The 7B-shaped config (or the demo's tiny one), its special token ids the tokenizer's."""
    from configuration_stgridpool import STGridPoolConfig
    from stgridpool.demo import tiny_config_kwargs

    if smoke:
        return STGridPoolConfig(**tiny_config_kwargs(tokenizer))
    from benchmarks.bench_pooling import build_7b_config

    base = build_7b_config()
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return STGridPoolConfig(
        vision_config=base.vision_config.to_dict(),
        text_config={**base.text_config.to_dict(), **ids},
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
    )


def build_processors(tokenizer, config, num_frames: int):
    """(ours, stock): `STGridPoolProcessor` and `LlavaOnevisionProcessor` on the same parts, sized to the tower."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from processing_stgridpool import STGridPoolProcessor
    from stgridpool.chat_template import CHAT_TEMPLATE

    side = config.vision_config.image_size
    size = {"height": side, "width": side}
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side]]
    common = dict(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tokenizer,
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    ours = STGridPoolProcessor(video_processor=LlavaOnevisionVideoProcessor(size=size, num_frames=num_frames), **common)
    stock = LlavaOnevisionProcessor(video_processor=LlavaOnevisionVideoProcessor(size=size), **common)
    return ours, stock


def make_clip(folder: Path, seconds: int, height: int, width: int, tile: int, seed: int) -> Path:
    """An h264 clip of `seconds`: a `tile`-second camera-like piece (bench_decode's content and encoder settings:
    25 fps, keyframes every 250 frames, 3 B-frames, crf 23, x264 veryfast) encoded once, then repeated."""
    from benchmarks.bench_decode import PRESET, RATE, camera_frames, repeat_clip

    if str(ROOT / "tests") not in sys.path:  # as the tests import it (another package may be named `tests`)
        sys.path.insert(0, str(ROOT / "tests"))
    from helpers import write_clip

    path = folder / f"h264_{seconds}s_{width}x{height}_seed{seed}.mp4"
    segment = folder / f"tile_{tile}s_{width}x{height}_seed{seed}.mp4"
    if not segment.exists():
        options = dict(rate=RATE, bframes=3, gop=250, crf=23, preset=PRESET)
        write_clip(segment, camera_frames(tile * RATE, height, width, seed=seed), **options)
    if not path.exists():
        repeat_clip(segment, path, seconds // tile)
    return path


def cuda_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------------------------
# File to first token
# ---------------------------------------------------------------------------------------------------------------


def file_to_first_token(model, ours_processor, stock_processor, clip: Path, num_frames: int, reps: int) -> dict:
    """Each path whole, `reps` times interleaved (after one warm-up each): seconds per stage and in all."""
    from transformers import LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.video_utils import load_video

    from stgridpool.prompt import processor_device, video_question_text_inputs
    from stgridpool.streaming import encode_video_while_decoding
    from video_stgridpool import read_video_pyav

    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = ours_processor.apply_chat_template(conversation, add_generation_prompt=True)
    classes = {
        "ours": (type(model), type(model.model)),
        "stock": (LlavaOnevisionForConditionalGeneration, LlavaOnevisionModel),
    }
    gpu = processor_device(model)
    paths = {
        "ours": (lambda: read_video_pyav(clip, num_frames=num_frames)[0], ours_processor, gpu, "ours"),
        "ours_cpu_processor": (lambda: read_video_pyav(clip, num_frames=num_frames)[0], ours_processor, None, "ours"),
        "stock": (
            lambda: load_video(str(clip), num_frames=num_frames, backend="pyav")[0],
            stock_processor,
            None,
            "stock",
        ),
    }

    def run_overlap():
        model.__class__, model.model.__class__ = classes["ours"]
        start = time.perf_counter()
        features, metadata = encode_video_while_decoding(model, ours_processor, clip, num_frames=num_frames)
        cuda_sync()  # the pooling it queued counts here, not in the first token
        encoded = time.perf_counter()
        count = len(metadata.frames_indices)
        inputs = video_question_text_inputs(ours_processor, count, QUESTION).to(model.device)
        video = BaseModelOutputWithPooling(pooler_output=features)
        with torch.inference_mode():
            logits = model(**inputs, mm_encoder_outputs={"video": video}, logits_to_keep=1, use_cache=True).logits
        token = int(logits[:, -1].argmax(-1).item())
        done = time.perf_counter()
        return dict(
            decode_s=encoded - start, processor_s=0.0, first_token_s=done - encoded, total_s=done - start,
            frames_shape=[count, metadata.height, metadata.width, 3], prompt_tokens=int(inputs["input_ids"].shape[1]),
            token=token,
        )  # fmt: skip

    def run(name):
        if name == "ours_overlap":
            return run_overlap()
        read, processor, device, model_kind = paths[name]
        model.__class__, model.model.__class__ = classes[model_kind]
        start = time.perf_counter()
        frames = read()
        decoded = time.perf_counter()
        kwargs = {"device": device} if device is not None else {}
        inputs = processor(text=prompt, videos=[frames], return_tensors="pt", **kwargs).to(model.device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(model.dtype)
        cuda_sync()
        processed = time.perf_counter()
        with torch.inference_mode():
            logits = model(**inputs, logits_to_keep=1, use_cache=True).logits[:, -1]
        token = int(logits.argmax(-1).item())  # on the host: the first token is there
        done = time.perf_counter()
        return dict(
            decode_s=decoded - start, processor_s=processed - decoded, first_token_s=done - processed,
            total_s=done - start, frames_shape=list(frames.shape), prompt_tokens=int(inputs["input_ids"].shape[1]),
            token=token,
        )  # fmt: skip

    names = [*paths, "ours_overlap"]
    runs = {name: [] for name in names}
    for name in names:
        run(name)  # warm-up: kernels compiled, handles made, the file in the page cache
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # a different order each rep
            runs[name].append(run(name))
    model.__class__, model.model.__class__ = classes["ours"]
    result = {}
    for name, rows in runs.items():
        result[name] = {
            key: median(r[key] for r in rows) for key in ("decode_s", "processor_s", "first_token_s", "total_s")
        }
        result[name].update(runs=rows, frames_shape=rows[0]["frames_shape"], prompt_tokens=rows[0]["prompt_tokens"])
    result["speedup_total_vs_stock"] = result["stock"]["total_s"] / result["ours"]["total_s"]
    result["speedup_total_overlap_vs_stock"] = result["stock"]["total_s"] / result["ours_overlap"]["total_s"]
    ours_token = runs["ours"][0]["token"]
    result["ours_overlap"]["same_token_as_ours"] = all(r["token"] == ours_token for r in runs["ours_overlap"])
    result["speedup_decode_vs_stock"] = result["stock"]["decode_s"] / result["ours"]["decode_s"]
    result["processor_gpu_vs_cpu"] = processor_agreement(ours_processor, clip, num_frames, gpu)
    return result


def processor_agreement(processor, clip: Path, num_frames: int, device) -> dict:
    """The video processor's pixels on `device` vs on the CPU, for the clip's sampled frames."""
    from video_stgridpool import read_video_pyav

    frames = read_video_pyav(clip, num_frames=num_frames)[0]
    video = processor.video_processor
    cpu = video(videos=[frames], return_tensors="pt")["pixel_values_videos"]
    other = video(videos=[frames], return_tensors="pt", device=device)["pixel_values_videos"]
    diff = (other.cpu() - cpu).abs()
    return dict(
        device=str(device), max_abs_diff=float(diff.max()), mean_abs_diff=float(diff.mean()),
        fraction_differing=float((diff > 0).float().mean()), one_level=2 / 255,  # a uint8 step after 1/255 and std 0.5
        output_device=str(other.device),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Evaluation throughput
# ---------------------------------------------------------------------------------------------------------------


def timed(fn, seconds: list, lock):
    """`fn` that adds its wall seconds to `seconds[0]` (from any thread)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with lock:
                seconds[0] += time.perf_counter() - start

    return wrapper


def evaluation(lm, clips: list[Path], new_tokens: int, rounds: int) -> dict:
    """`generate_until` and `loglikelihood` over one request per clip, prefetch 0 and 2 (`rounds` times each,
    alternating): wall seconds, videos per hour, seconds spent decoding and in the model, the answers."""
    from lmms_eval.api.instance import Instance

    from stgridpool.integrations.lmms_eval import lmms_model

    docs = [{"video": str(path)} for path in clips]
    lm.task_dict = {"bench": {"test": docs}}
    to_visual = lambda doc: [doc["video"]]  # noqa: E731
    meta = {"task": "bench", "doc_id": 0, "repeats": 1}
    gen = {"max_new_tokens": new_tokens, "temperature": 0, "until": []}
    requests = {
        "generate_until": [
            Instance(
                request_type="generate_until",
                idx=0,
                metadata=meta,
                arguments=(f"clip {i} : {QUESTION}", gen, to_visual, i, "bench", "test"),
            )  # fmt: skip
            for i in range(len(docs))
        ],
        "loglikelihood": [
            Instance(
                request_type="loglikelihood",
                idx=0,
                metadata=meta,
                arguments=(f"clip {i} : {QUESTION}", " a person", to_visual, i, "bench", "test"),
            )  # fmt: skip
            for i in range(len(docs))
        ],
    }
    read = lmms_model.load_video
    result = {}
    for kind, batch in requests.items():
        model_method = "generate" if kind == "generate_until" else "forward"
        getattr(lm, kind)(batch[:1])  # warm-up
        runs = {0: [], 2: []}
        for _ in range(rounds):
            for prefetch in (0, 2):
                lm.prefetch = prefetch
                decode_s, model_s, lock = [0.0], [0.0], threading.Lock()
                lmms_model.load_video = timed(read, decode_s, lock)
                setattr(lm.model, model_method, timed(getattr(lm.model, model_method), model_s, lock))
                try:
                    cuda_sync()
                    start = time.perf_counter()
                    answers = getattr(lm, kind)(batch)
                    cuda_sync()
                    wall = time.perf_counter() - start
                finally:
                    lmms_model.load_video = read
                    delattr(lm.model, model_method)
                runs[prefetch].append(
                    dict(
                        wall_s=wall,
                        decode_s=decode_s[0],
                        model_s=model_s[0],
                        answers=[list(a) if isinstance(a, tuple) else a for a in answers],
                    )
                )
        row = {}
        for prefetch, rs in runs.items():
            wall = median(r["wall_s"] for r in rs)
            row[f"prefetch_{prefetch}"] = dict(
                wall_s=wall, videos_per_hour=len(batch) / wall * 3600, runs=rs, answers=rs[0]["answers"]
            )
        all_answers = [r["answers"] for rs in runs.values() for r in rs]
        row["answers_identical"] = all(a == all_answers[0] for a in all_answers)
        row["distinct_answers"] = len({json.dumps(a) for a in all_answers[0]})
        # Against the first sequential round, request by request: a later sequential round differing too says the
        # GPU does not repeat itself, whatever prefetch does.
        first = runs[0][0]["answers"]
        row["requests_differing_from_first_sequential_round"] = {
            f"prefetch_{prefetch}": [[i for i, (a, b) in enumerate(zip(r["answers"], first)) if a != b] for r in rs]
            for prefetch, rs in runs.items()
        }
        row["speedup"] = row["prefetch_0"]["wall_s"] / row["prefetch_2"]["wall_s"]
        result[kind] = row
        # printed as each kind ends: a run cut short by its time limit still shows the kinds it finished
        brief = {k: row[k] for k in ("speedup", "answers_identical", "requests_differing_from_first_sequential_round")}
        print(kind, json.dumps(brief), flush=True)
    lm.prefetch = 2
    return result


# ---------------------------------------------------------------------------------------------------------------
# Attention implementations
# ---------------------------------------------------------------------------------------------------------------


def attention(config, names: list[str], device, dtype, num_frames: int, reps: int, new_tokens: int) -> dict:
    """Each implementation after the first against the first, on one model whose attention is switched."""
    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = STGridPoolLlavaOnevisionForConditionalGeneration._from_config(
            config, dtype=dtype, attn_implementation=names[0]
        ).eval()
    gen = torch.Generator().manual_seed(1)
    side, frame = config.vision_config.image_size, config.frame_size
    video_tokens = config.video_pooling.num_tokens(num_frames, frame, frame)
    words = torch.randint(100, config.text_config.vocab_size, (90,), generator=gen)

    def prompt(extra: int):
        text = words[: 30 + extra]
        return torch.cat([text[:20], torch.full((video_tokens,), config.video_token_id), text[20:]])

    pixels = [torch.randn(num_frames, 3, side, side, generator=gen).to(dtype).to(device) for _ in range(2)]
    prompts = [prompt(0), prompt(20)]  # two lengths: the first is left-padded in the batch
    pad = config.text_config.pad_token_id or 0
    width = max(len(p) for p in prompts)
    batch = dict(
        input_ids=torch.stack([torch.cat([torch.full((width - len(p),), pad), p]) for p in prompts]).to(device),
        attention_mask=torch.stack(
            [
                torch.cat([torch.zeros(width - len(p), dtype=torch.long), torch.ones(len(p), dtype=torch.long)])
                for p in prompts
            ]
        ).to(device),
        pixel_values_videos=torch.stack(pixels),
    )
    alone = [
        dict(input_ids=p[None].to(device), attention_mask=torch.ones(1, len(p), dtype=torch.long, device=device),
             pixel_values_videos=x[None])
        for p, x in zip(prompts, pixels)
    ]  # fmt: skip
    on_gpu = torch.device(device).type == "cuda"
    result = {}
    for name in names:
        model.set_attn_implementation(name)
        config_of = model.config
        row = dict(
            config_attn=config_of._attn_implementation,
            text_attn=config_of.text_config._attn_implementation,
            vision_attn=config_of.vision_config._attn_implementation,
        )

        def first(inputs):
            return model(**inputs, logits_to_keep=1, use_cache=True).logits[:, -1].float()

        with torch.inference_mode():
            first(alone[0])  # warm-up (a first call compiles flash-attn-4's kernels)
            cuda_sync()
            if on_gpu:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            logits = first(alone[0])
            cuda_sync()
            if on_gpu:
                row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
                row["peak_above_weights_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            times = []
            for _ in range(reps):
                cuda_sync()
                start = time.perf_counter()
                first(alone[0])
                cuda_sync()
                times.append(time.perf_counter() - start)
            row["ttft_ms"], row["ttft_ms_all"] = 1e3 * median(times), [1e3 * t for t in times]
            out = model.generate(**alone[0], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=pad)  # fmt: skip
            row["tokens"] = out[0, alone[0]["input_ids"].shape[1] :].tolist()
            row["first_logits"] = logits[0].cpu()
            batched = first(batch)
            each = torch.cat([first(inputs) for inputs in alone])
            row["padded_batch_vs_alone_max_abs_diff"] = float((batched - each).abs().max())
            row["padded_batch_same_argmax"] = bool(torch.equal(batched.argmax(-1), each.argmax(-1)))
        result[name] = row
    reference = result[names[0]]
    for name in names:
        row = result[name]
        row["same_tokens_as_" + names[0]] = row["tokens"] == reference["tokens"]
        row["first_logits_max_abs_diff_vs_" + names[0]] = float(
            (row["first_logits"] - reference["first_logits"]).abs().max()
        )
        row["first_logits_max_abs"] = float(row["first_logits"].abs().max())
    for row in result.values():
        row.pop("first_logits")
    result["prompt_tokens"] = len(prompts[0])
    model = None  # frees the weights before the next section
    if on_gpu:
        torch.cuda.empty_cache()
    return result


# ---------------------------------------------------------------------------------------------------------------


def versions() -> dict:
    import av
    import huggingface_hub
    import transformers

    out = dict(
        python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
        huggingface_hub=huggingface_hub.__version__, av=av.__version__,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        cpu_count=len(os.sched_getaffinity(0)),
    )  # fmt: skip
    for name in ("flash_attn", "flash_attn_4", "cutlass", "lmms_eval"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "present")
        except Exception:  # noqa: BLE001  (not usable here)
            out[name] = None
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="clips and the checkpoint go here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny model, tiny clips, CPU: the script runs")
    parser.add_argument("--only", default=None, help=f"comma-separated sections of {SECTIONS} (default: ftft,eval, "
                        "and attn when --attn names two or more)")  # fmt: skip
    parser.add_argument("--attn", default="sdpa", help="attention implementations, the first the reference "
                        "and the one the ftft and eval sections use")  # fmt: skip
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="evaluation rounds (prefetch 0 and 2 each)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated (default 16; 4 with --smoke)")
    parser.add_argument("--deterministic", action="store_true", help="deterministic GPU algorithms (see below)")
    parser.add_argument("--sdpa-backend", default=None, help="the evaluation's lmms-eval model_args sdpa_backend "
                        "(default: PyTorch picks the attention kernel per call)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.deterministic:
        # PyTorch's deterministic switches (run C of RESULTS.md used them). They did not make bf16 greedy decoding
        # repeat itself on the H100: warn_only lets an op without a deterministic version run, and the attention
        # kernel of a decoding step still differed from run to run (benchmarks/decode_repro.py). cuBLAS reads its
        # workspace setting when its first handle is made: set it first.
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True, warn_only=True)
    spec = SMOKE if args.smoke else FULL
    attn_names = args.attn.split(",")
    sections = args.only.split(",") if args.only else ["ftft", "eval"] + (["attn"] if len(attn_names) > 1 else [])
    new_tokens = args.new_tokens or (4 if args.smoke else 16)
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --smoke)")
    results = dict(
        command=" ".join([sys.executable] + sys.argv),
        versions=versions(),
        sections=sections,
        deterministic=args.deterministic,
        sdpa_backend=args.sdpa_backend,
    )
    print(json.dumps(results["versions"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))

    from stgridpool.demo import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(1000 if args.smoke else 152064)  # Qwen2-7B's vocabulary
    config = build_config(tokenizer, args.smoke)
    if "attn" in sections:
        results["attn"] = attention(config, attn_names, device, dtype, spec["frames"], args.reps, new_tokens)
        save()
        print_attn(results["attn"], attn_names)
    if {"ftft", "eval"} & set(sections):
        start = time.perf_counter()
        clips = args.work / "clips"
        clips.mkdir(exist_ok=True)
        seconds, height, width = spec["clip"]
        clip = make_clip(clips, seconds, height, width, spec["tile"], seed=0)
        results["clip_s"] = time.perf_counter() - start
        start = time.perf_counter()
        checkpoint = args.work / "checkpoint"
        ours_processor, stock_processor = build_processors(tokenizer, config, spec["frames"])
        from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration

        torch.manual_seed(0)
        with torch.device(device):
            model = STGridPoolLlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype)
        model.save_pretrained(checkpoint)
        ours_processor.save_pretrained(checkpoint)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        results["checkpoint_s"] = time.perf_counter() - start
        from stgridpool.integrations.lmms_eval.lmms_model import STGridPoolLMM

        lm = STGridPoolLMM(pretrained=str(checkpoint), device=device, dtype=str(dtype).removeprefix("torch."),
                           max_frames_num=spec["frames"], attn_implementation=attn_names[0],
                           sdpa_backend=args.sdpa_backend)  # fmt: skip
        results["attn_implementation"] = attn_names[0]
        results["processor_device"] = str(lm.processor_device)
        if "ftft" in sections:
            results["ftft"] = file_to_first_token(
                lm.model, lm.processor, stock_processor, clip, spec["frames"], args.reps
            )
            results["ftft"]["clip"] = dict(path=clip.name, mb=clip.stat().st_size / 1e6, seconds=seconds)
            save()
            print_ftft(results["ftft"])
        if "eval" in sections:  # its clips made only now: the first section's results are saved before
            start = time.perf_counter()
            eval_clips = [
                make_clip(clips, s, height, width, spec["tile"], seed=i % 3) for i, s in enumerate(spec["eval_seconds"])
            ]
            results["eval_clips_s"] = time.perf_counter() - start
            results["eval"] = evaluation(lm, eval_clips, new_tokens, args.rounds)
            results["eval"]["clips"] = [dict(path=p.name, mb=p.stat().st_size / 1e6) for p in eval_clips]
            results["eval"]["total_video_s"] = sum(spec["eval_seconds"])
            save()
            print_eval(results["eval"])
    save()
    return 0


def print_ftft(r: dict) -> None:
    print("\n| path | decode s | processor s | first token s | file to first token s |\n|---|---:|---:|---:|---:|")
    for name in ("ours", "ours_cpu_processor", "ours_overlap", "stock"):
        x = r[name]
        print(
            f"| {name} | {x['decode_s']:.3f} | {x['processor_s']:.3f} | {x['first_token_s']:.3f} | {x['total_s']:.3f} |"
        )
    print(f"file to first token: {r['speedup_total_vs_stock']:.2f}x stock; decode {r['speedup_decode_vs_stock']:.2f}x; "
          f"processor on {r['processor_gpu_vs_cpu']['device']} vs CPU: max abs diff "
          f"{r['processor_gpu_vs_cpu']['max_abs_diff']:.2e}")  # fmt: skip
    print(f"overlapped (ours_overlap): {r['speedup_total_overlap_vs_stock']:.2f}x stock; first token the same as "
          f"ours: {r['ours_overlap']['same_token_as_ours']}")  # fmt: skip


def print_eval(r: dict) -> None:
    print("\n| requests | prefetch | wall s | videos/hour | decode s (sum) | model s (sum) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("generate_until", "loglikelihood"):
        for prefetch in (0, 2):
            x = r[kind][f"prefetch_{prefetch}"]
            run = x["runs"][0]
            print(f"| {kind} | {prefetch} | {x['wall_s']:.2f} | {x['videos_per_hour']:.0f} | {run['decode_s']:.2f} | "
                  f"{run['model_s']:.2f} |")  # fmt: skip
        print(f"{kind}: {r[kind]['speedup']:.2f}x; answers identical: {r[kind]['answers_identical']} "
              f"({r[kind]['distinct_answers']} distinct); requests differing from the first prefetch 0 round: "
              f"{r[kind]['requests_differing_from_first_sequential_round']}")  # fmt: skip


def print_attn(r: dict, names: list[str]) -> None:
    print("\n| attention | TTFT ms | peak GiB | same tokens | first logits max abs diff | padded batch vs alone |")
    print("|---|---:|---:|---|---:|---:|")
    for name in names:
        x = r[name]
        print(f"| {name} | {x['ttft_ms']:.1f} | {x.get('peak_gib', float('nan')):.2f} | "
              f"{x['same_tokens_as_' + names[0]]} | {x['first_logits_max_abs_diff_vs_' + names[0]]:.3f} "
              f"(scale {x['first_logits_max_abs']:.1f}) | {x['padded_batch_vs_alone_max_abs_diff']:.3f} |")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
