"""The `stgridpool` lmms-eval model: any LLaVA-OneVision / LLaVA-Video checkpoint, with ST-GridPool settings
overridable from `--model_args`.

    accelerate launch --num_processes 8 -m lmms_eval --model stgridpool \
        --model_args pretrained=REPO_OR_DIR,max_frames_num=64,frame_sampling=authors,video_pooling_mode=stgridpool \
        --tasks videomme --batch_size 1 --output_path results/

Under `accelerate launch` each process holds its own copy of the model on its own device and lmms-eval shards the
documents and gathers the results; `device_map=auto` instead spreads one copy over all visible GPUs (one process).

While the model answers one request, background threads decode and process the next `prefetch` ones (default 2):
a bounded queue, so memory does not grow with the number of requests, and the answers come in the requests' order.
"""

from __future__ import annotations

import contextlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from itertools import islice

import numpy as np
import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

from configuration_stgridpool import STGRIDPOOL_FIELDS
from stgridpool.options import parse_bool, parse_setting
from stgridpool.prompt import processor_device

LOADER_ARGS = (
    "pretrained", "revision", "device", "device_map", "dtype", "attn_implementation", "batch_size", "max_frames_num",
    "frame_sampling", "trust_remote_code", "prefetch", "sdpa_backend",
)
# `uniform`: `max_frames_num` frames evenly spaced (lmms-eval's llava_onevision / llava_hf models), every frame of a
# shorter video. `authors`: one frame a second, capped at `max_frames_num` (lmms-eval's llava_vid model, as the
# paper's runs).
FRAME_SAMPLINGS = ("uniform", "authors")
DEFAULT_MAX_NEW_TOKENS = 1024  # a request whose task names no max_new_tokens
# `sdpa_backend`: one of PyTorch's attention kernels for every `sdpa` call, instead of PyTorch's pick per call. On an
# H100 its pick for a decoding step did not give the same bits from run to run, so bf16 greedy answers could differ
# between two runs of one task; with `flash` they repeated themselves bit for bit.
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def uniform_indices(total_num_frames: int, max_frames_num: int) -> np.ndarray:
    """`max_frames_num` frame indices evenly spaced over `0 .. total_num_frames - 1`, truncated: lmms-eval's
    llava_onevision / llava_hf sampling, except that a video shorter than `max_frames_num` gives each of its frames
    once (theirs repeats frames up to `max_frames_num`: more tokens, no more content, memory without bound)."""
    return np.linspace(0, total_num_frames - 1, min(max_frames_num, total_num_frames), dtype=int)


def authors_indices(total_num_frames: int, fps: float | None, max_frames_num: int) -> np.ndarray:
    """One frame a second (every `round(fps)`-th frame from frame 0); only when that gives more than
    `max_frames_num` frames, `uniform_indices` instead: lmms-eval's llava_vid sampling (`video_fps=1`,
    `force_sample=False`), which the paper's runs used. A 16 s clip gets 16 frames, not `max_frames_num`.

    fps: the video's frame rate; None (a one-frame video) counts as one frame a second."""
    step = max(1, round(fps)) if fps else 1  # a video under 0.5 fps still keeps every frame, not a 0 step
    indices = np.arange(0, total_num_frames, step)
    if len(indices) > max_frames_num:
        return uniform_indices(total_num_frames, max_frames_num)
    return indices


def load_video(path: str, max_frames_num: int, frame_sampling: str = "uniform") -> np.ndarray:
    """Decode the frames `frame_sampling` picks (see FRAME_SAMPLINGS) from the video at `path`: uint8 [T, H, W, 3].

    Decoding is the processor's PyAV reader; only the indices are chosen here."""
    from video_stgridpool import read_video_pyav

    def indices(metadata):
        if frame_sampling == "authors":
            return authors_indices(metadata.total_num_frames, metadata.fps, max_frames_num)
        return uniform_indices(metadata.total_num_frames, max_frames_num)

    return read_video_pyav(path, sample_indices_fn=indices)[0]


def prefetched(prepare, items, depth: int):
    """Yield `prepare(item)` for each of `items`, in order, while up to `depth` of the next items are prepared in
    `depth` background threads: at most `depth` results wait besides the one in use, however many items there are.
    An exception raised by `prepare(item)` is raised here when that item's turn comes. `depth` 0: no threads."""
    if depth == 0:
        yield from map(prepare, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="stgridpool-prepare") as pool:
        pending = deque(pool.submit(prepare, item) for item in islice(items, depth))
        try:
            while pending:
                result = pending.popleft().result()
                pending.extend(pool.submit(prepare, item) for item in islice(items, 1))
                yield result
        finally:  # stopped early (an error here or in the caller): start nothing more
            for future in pending:
                future.cancel()


def max_frames_in_context(source) -> int:
    """The most frames of one video whose tokens fit in the language model's context, for a repo checked by
    `stgridpool.loading.resolve_model` (a video's tokens grow by the same count with each frame)."""
    from stgridpool.loading import build_config, context_length

    vision = build_config(source).vision_config
    side = vision.image_size // vision.patch_size
    fixed = source.settings.num_tokens(0, side, side)
    return (context_length(source) - fixed) // (source.settings.num_tokens(1, side, side) - fixed)


def check_max_new_tokens(value, context: int, task: str) -> int:
    """A request's max_new_tokens (its task's generation_kwargs; None: DEFAULT_MAX_NEW_TOKENS, at most `context`):
    an integer 1 to the model's context, else a ValueError naming the task and the value."""
    if value is None:
        return min(DEFAULT_MAX_NEW_TOKENS, context)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= context:
        raise ValueError(
            f"task {task}: generation_kwargs max_new_tokens={value!r} is invalid: allowed are integers 1 to {context} "
            "(the model's context, its text config's max_position_embeddings)"
        )
    return value


class STGridPoolLMM(lmms):
    """lmms-eval model `stgridpool`: generation (`generate_until`) and multiple-choice (`loglikelihood`) tasks on
    videos (decoded with PyAV, frames picked by `frame_sampling`, at most `max_frames_num`) and images, batch size 1.
    The next `prefetch` requests are decoded and processed while the model runs (0: one after the other); the
    processors run on the model's GPU when it is on one (`stgridpool.prompt.processor_device`). `sdpa_backend`
    holds the model's `sdpa` attention to one PyTorch kernel (`SDPA_BACKENDS`).

    Prompts are the task's own (`doc_to_text` with the `default` block of its `lmms_eval_specific_kwargs`: this
    model has no block of its own), as in the paper's runs."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str = "main",
        device: str | None = None,
        device_map: str = "",
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int = 1,
        max_batch_size: int | None = None,  # lmms-eval passes it; unused at batch size 1
        frame_sampling: str = "uniform",
        max_frames_num: int = 32,
        trust_remote_code: bool = False,
        prefetch: int = 2,
        sdpa_backend: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__()
        unknown = sorted(set(kwargs) - set(STGRIDPOOL_FIELDS))
        if unknown:
            raise ValueError(
                f"model_args {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)} not understood by the stgridpool "
                "model: "
                f"allowed are {', '.join(LOADER_ARGS + STGRIDPOOL_FIELDS)}"
            )
        if str(batch_size) != "1":
            raise ValueError(f"model_args batch_size={batch_size!r} is invalid: allowed is 1")
        if isinstance(max_frames_num, bool) or not isinstance(max_frames_num, int) or max_frames_num < 1:
            raise ValueError(f"model_args max_frames_num={max_frames_num!r} is invalid: allowed are integers >= 1")
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"model_args prefetch={prefetch!r} is invalid: allowed are integers >= 0 (0: none)")
        if sdpa_backend is not None and sdpa_backend not in SDPA_BACKENDS:
            allowed = ", ".join(SDPA_BACKENDS)
            raise ValueError(f"model_args sdpa_backend={sdpa_backend!r} is invalid: allowed are {allowed}")
        if frame_sampling not in FRAME_SAMPLINGS:
            allowed = ", ".join(FRAME_SAMPLINGS)
            raise ValueError(f"model_args frame_sampling={frame_sampling!r} is invalid: allowed are {allowed}")
        trust_remote_code = parse_bool(trust_remote_code, "model_args trust_remote_code")  # lmms-eval gives text
        overrides = {name: parse_setting(name, value, f"model_args {name}") for name, value in kwargs.items()}

        accelerator = Accelerator()
        if accelerator.num_processes > 1:  # data parallel: one full model per process, on that process's device
            if device_map not in ("", None):
                raise ValueError(
                    f"model_args device_map={device_map!r} is invalid under a {accelerator.num_processes}-process "
                    "launch: "
                    "allowed is '' (each process uses its own device); use device_map=auto with one process"
                )
            self._device = accelerator.device
            load_device_map = {"": str(self._device)}
        elif device_map:
            self._device = None  # set from the model below
            load_device_map = device_map
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            load_device_map = None
        dtypes = ("auto", "bfloat16", "float16", "float32")
        if dtype not in dtypes:
            raise ValueError(f"model_args dtype={dtype!r} is invalid: allowed are {', '.join(dtypes)}")
        model_kwargs = {"dtype": "auto" if dtype == "auto" else getattr(torch, dtype)}
        if attn_implementation:
            model_kwargs["attn_implementation"] = attn_implementation
        if load_device_map is not None:
            model_kwargs["device_map"] = load_device_map
        # The loader the CLI uses (stgridpool.loading): code from the repo runs only with trust_remote_code=true,
        # and a repo whose code is this project's installed code loads with the installed classes. An unusable or
        # untrusted repo raises its ModelLoadError (a ValueError, one line).
        from stgridpool.loading import context_length, load_model_and_processor, resolve_model

        source = resolve_model(
            pretrained,
            overrides,
            revision=None if revision == "main" else revision,
            trust_remote_code=trust_remote_code,
            label="model_args pretrained",
            trust_hint="trust_remote_code=true in --model_args",
        )
        self.context_length = context_length(source)
        frames_limit = max_frames_in_context(source)
        if max_frames_num > frames_limit:  # decoding them would hold frames the model can never take
            raise ValueError(
                f"model_args max_frames_num={max_frames_num!r} is invalid: allowed are integers 1 to {frames_limit} "
                f"(more frames make more video tokens than the model's context of {self.context_length} tokens, its "
                "max_position_embeddings)"
            )
        self._model, self.processor = load_model_and_processor(source, **model_kwargs)
        self.processor.tokenizer.padding_side = "left"
        self._model.eval()
        if self._device is None:
            self._device = self._model.device  # first device of a spread model: where inputs go
        elif load_device_map is None:
            self._model.to(self._device)
        self.accelerator = accelerator
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        self.pretrained = pretrained
        self.max_frames_num = max_frames_num
        self.frame_sampling = frame_sampling
        self.prefetch = prefetch
        self.sdpa_backend = sdpa_backend
        self.processor_device = processor_device(self._model)
        self.batch_size_per_gpu = 1

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    def _attention(self):
        """The context the model runs in: every `sdpa` call held to `sdpa_backend`'s kernel, if one is named."""
        if self.sdpa_backend is None:
            return contextlib.nullcontext()
        return sdpa_kernel(SDPA_BACKENDS[self.sdpa_backend])

    def _inputs(self, context: str, visuals: list, continuation: str | None = None):
        """Processor inputs for one request: the chat-formatted prompt (plus `continuation` as the assistant's
        answer, for scoring) with its videos and images. Returns (inputs, prompt length in tokens or None)."""
        videos = [load_video(v, self.max_frames_num, self.frame_sampling) for v in visuals if isinstance(v, str)]
        images = [v.convert("RGB") for v in visuals if isinstance(v, Image.Image)]
        if len(videos) + len(images) != len(visuals):
            kinds = sorted({type(v).__name__ for v in visuals if not isinstance(v, (str, Image.Image))})
            raise ValueError(
                f"stgridpool model: unsupported visual type(s) {kinds}: allowed are video paths and PIL images"
            )
        content = [{"type": "video"}] * len(videos) + [{"type": "image"}] * len(images)
        content.append({"type": "text", "text": context})
        prompt = self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        text = prompt if continuation is None else prompt + continuation
        media = {"videos": videos or None, "images": images or None, "device": self.processor_device}
        inputs = self.processor(text=[text], return_tensors="pt", **media).to(self.device)
        for key in ("pixel_values", "pixel_values_videos"):
            if key in inputs and inputs[key].is_floating_point():
                inputs[key] = inputs[key].to(self.model.dtype)
        prompt_len = None
        if continuation is not None:
            prompt_len = self.processor(text=[prompt], return_tensors="pt", **media)["input_ids"].shape[1]
        return inputs, prompt_len

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id: int) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        return [v for v in (visuals or []) if v is not None]

    def _generation_inputs(self, request: Instance) -> tuple:
        """(context, gen_kwargs without `until`, until strings, max_new_tokens, processor inputs) of a
        `generate_until` request."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new_tokens = check_max_new_tokens(gen_kwargs.get("max_new_tokens"), self.context_length, task)
        inputs, _ = self._inputs(context, self._visuals(doc_to_visual, task, split, doc_id))
        return context, gen_kwargs, until, max_new_tokens, inputs

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or sampled, if the task asks) answers, cut at the task's `until` strings."""
        answers = []
        prepared = prefetched(self._generation_inputs, requests, self.prefetch)
        for context, gen_kwargs, until, max_new_tokens, inputs in tqdm(
            prepared, total=len(requests), disable=self.rank != 0, desc="stgridpool generate"
        ):
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            do_sample = temperature > 0  # lmms-eval tasks say temperature 0 for greedy
            generate_kwargs = dict(
                max_new_tokens=max_new_tokens,
                num_beams=int(gen_kwargs.get("num_beams", 1) or 1),
                do_sample=do_sample,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            if do_sample:
                generate_kwargs.update(temperature=temperature, top_p=gen_kwargs.get("top_p") or 1.0)
            with torch.inference_mode(), self._attention():
                output = self.model.generate(**inputs, **generate_kwargs)
            text = self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return answers

    def _scoring_inputs(self, request: Instance) -> tuple:
        """(processor inputs of prompt + continuation, prompt length in tokens) of a `loglikelihood` request."""
        context, continuation, doc_to_visual, doc_id, task, split = request.args
        if not isinstance(continuation, str):
            continuation = continuation(self.task_dict[task][split][doc_id])
        return self._inputs(context, self._visuals(doc_to_visual, task, split, doc_id), continuation)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(negative log-likelihood of the continuation, summed over its tokens; whether greedy decoding gives it).

        lmms-eval's multiple-choice scoring picks the choice with the *lowest* value (`np.argmin`, its models
        return losses), so this returns the summed NLL, not the log-probability.
        """
        results = []
        prepared = prefetched(self._scoring_inputs, requests, self.prefetch)
        for inputs, prompt_len in tqdm(
            prepared, total=len(requests), disable=self.rank != 0, desc="stgridpool loglikelihood"
        ):
            with torch.inference_mode(), self._attention():
                logits = self.model(**inputs).logits[0].float()
            targets = inputs["input_ids"][0, prompt_len:]
            log_probs = torch.log_softmax(logits[prompt_len - 1 : -1], dim=-1)
            nll = -log_probs.gather(1, targets[:, None]).sum().item()
            greedy = bool((log_probs.argmax(-1) == targets).all())
            results.append((nll, greedy))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("stgridpool model: multi-round generation is not supported")
