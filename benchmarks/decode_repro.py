"""Does greedy decoding repeat itself on this GPU, and if not, which op departs first? (issue 25)

Two sequential rounds of the evaluation benchmark (`bench_file_to_answer --only eval`, prefetch 0 both times) gave
different bf16 `generate_until` answers on an H100 while every first token and every `loglikelihood` was bit-identical.
This runs what one such request runs (the 30 s 720p clip decoded with the lmms-eval model's `load_video`, the processor
on the GPU, `generate` greedy) `--runs` times in one process, on the benchmark's 7B-shaped random-weight model, and
records every leaf module's input and output at every forward call. It prints, for each run, where it first departs
from the first run: the forward call (0 = the prompt, k = the step reading the k-th generated token), the module,
and whether that module's input was still equal (then the module's own op differs) or not (then an op between
modules does, e.g. the attention kernel inside `self_attn`, whose first leaf after it is `o_proj`). It does so for
each of `--variants`: attention as Transformers' `sdpa` leaves PyTorch to pick the kernel, `sdpa` held to one
PyTorch backend (`torch.nn.attention.sdpa_kernel`; `same_as_first_variant_run_0` says whether its first run gave
the first variant's bits, which names PyTorch's pick only where the two repeat themselves), and `eager`.

    python -m benchmarks.decode_repro --work /dev/shm/fta --json $OUT/decode_repro.json
    python -m benchmarks.decode_repro --work /tmp/fta --smoke    # tiny, CPU: the script runs
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_file_to_answer import FULL, QUESTION, SMOKE, build_config, build_processors, make_clip  # noqa: E402

# `sdpa` as PyTorch picks per call, `sdpa` held to one kernel (the lmms-eval model's `sdpa_backend` names), `eager`
VARIANTS = ("sdpa", "flash", "efficient", "math", "cudnn", "eager")


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """A position-weighted sum of the tensor's bit patterns: any changed bit changes it (all but surely)."""
    flat = t.detach().contiguous().reshape(-1)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.int64) * 2654435761 % 1000003
    return (flat.view(bits).to(torch.int64) * weights).sum()


class Recorder:
    """Every leaf module's first tensor input and its output, per forward call of the whole model: small ones
    kept whole (the decode steps'), large ones (the prompt's) as fingerprints."""

    def __init__(self, model):
        self.records, self.call = [], -1
        model.register_forward_pre_hook(self._next_call)
        for name, module in model.named_modules():
            if not list(module.children()):
                module.register_forward_pre_hook(lambda m, args, name=name: self._keep(name, "in", args))
                module.register_forward_hook(lambda m, args, out, name=name: self._keep(name, "out", out))

    def _next_call(self, module, args):
        self.call += 1

    def _keep(self, name, side, value):
        if isinstance(value, (tuple, list)):
            value = next((v for v in value if isinstance(v, torch.Tensor)), None)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return
        whole = value.detach().clone() if value.numel() <= 1 << 20 else None
        self.records.append((self.call, name, side, fingerprint(value), whole))

    def start(self):
        self.records, self.call = [], -1


def first_departure(base: list, run: list) -> dict | None:
    for (call, name, side, fp, whole), (_, name2, _, fp2, whole2) in zip(base, run):
        if name != name2:
            return dict(call=call, module=name, note=f"different module order: {name2}")
        if fp.item() != fp2.item():
            row = dict(call=call, module=name, side=side)
            if whole is not None and whole2 is not None:
                diff = (whole.float() - whole2.float()).abs()
                row.update(max_abs_diff=diff.max().item(), elements_differing=int((diff > 0).sum()),
                           elements=diff.numel(), scale=whole.float().abs().max().item())  # fmt: skip
            return row
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="the clip goes here")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of " + ",".join(VARIANTS))
    args = parser.parse_args(argv)
    import transformers

    from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
    from stgridpool.demo import build_tiny_tokenizer
    from stgridpool.integrations.lmms_eval.lmms_model import SDPA_BACKENDS, load_video
    from stgridpool.prompt import processor_device

    spec = SMOKE if args.smoke else FULL
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    tokenizer = build_tiny_tokenizer(1000 if args.smoke else 152064)
    config = build_config(tokenizer, args.smoke)
    processor, _ = build_processors(tokenizer, config, spec["frames"])
    torch.manual_seed(0)
    with torch.device(device):
        model = STGridPoolLlavaOnevisionForConditionalGeneration._from_config(config, dtype=dtype).eval()
    (args.work / "clips").mkdir(parents=True, exist_ok=True)
    _, height, width = spec["clip"]
    clip = make_clip(args.work / "clips", spec["eval_seconds"][0], height, width, spec["tile"], seed=0)
    recorder = Recorder(model)
    content = [{"type": "video"}, {"type": "text", "text": f"clip 0 : {QUESTION}"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def one_run(attention) -> dict:
        frames = load_video(str(clip), spec["frames"])
        inputs = processor(text=[prompt], videos=[frames], return_tensors="pt", device=processor_device(model))
        inputs = inputs.to(device)
        inputs["pixel_values_videos"] = inputs["pixel_values_videos"].to(dtype)
        recorder.start()
        with torch.inference_mode(), attention():
            out = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)  # fmt: skip
        top2 = [step[0].float().topk(2).values for step in out.logits]
        return dict(pixels=fingerprint(inputs["pixel_values_videos"]).item(), records=recorder.records,
                    tokens=out.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
                    top2_gaps=[(v[0] - v[1]).item() for v in top2])  # fmt: skip

    report = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  transformers=transformers.__version__, variants={})  # fmt: skip
    default_first = None
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown {variant!r}; allowed: {', '.join(VARIANTS)}")
        model.set_attn_implementation("eager" if variant == "eager" else "sdpa")
        backend = SDPA_BACKENDS.get(variant)
        attention = (lambda: sdpa_kernel(backend)) if backend is not None else contextlib.nullcontext
        started = time.perf_counter()
        try:
            runs = [one_run(attention) for _ in range(args.runs)]
        except RuntimeError as error:  # a backend that cannot take these shapes
            report["variants"][variant] = dict(error=str(error).splitlines()[0])
            print(variant, "error:", report["variants"][variant]["error"], flush=True)
            continue
        default_first = default_first or runs[0]["records"]
        departures = [None] + [first_departure(runs[0]["records"], run["records"]) for run in runs[1:]]
        row = dict(
            seconds=time.perf_counter() - started,
            same_bits_every_run=all(departure is None for departure in departures),
            same_tokens_every_run=all(run["tokens"] == runs[0]["tokens"] for run in runs),
            same_as_first_variant_run_0=first_departure(default_first, runs[0]["records"]) is None,
            runs=[],
        )
        for run, departure in zip(runs, departures):
            row["runs"].append(dict(
                same_pixels=run["pixels"] == runs[0]["pixels"],
                same_tokens=run["tokens"] == runs[0]["tokens"],
                tokens=run["tokens"],
                top2_gaps=run["top2_gaps"],
                first_departure=departure,
            ))  # fmt: skip
        report["variants"][variant] = row
        print(variant, json.dumps({k: v for k, v in row.items() if k != "runs"}), flush=True)
        for run in row["runs"][1:]:
            print("   ", json.dumps(run["first_departure"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
