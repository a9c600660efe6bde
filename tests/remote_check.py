"""Run in a fresh Python process by tests/test_convert.py: load converted repos the way a Hub user would.

The project's modules must not be importable here, so everything ST-GridPool comes from each repo's own code
(transformers_modules). Usage: python remote_check.py PROJECT_DIR JOBS, JOBS a JSON list of {"name", "check"
(full, stock, original or pipeline), "repo" (a folder or a Hub id), "src", "work"}; prints one JSON line: {name:
results}. One process checks every repo: each process spends about 5 CPU seconds importing Transformers before it
checks anything.
"""

import importlib
import importlib.abc
import json
import sys
from pathlib import Path

BLOCKED = (
    "configuration_stgridpool", "modeling_stgridpool_llava", "processing_stgridpool", "stgridpool_triton",
    "video_stgridpool",
)  # fmt: skip


class _Refuse(importlib.abc.MetaPathFinder):
    """Refuses the project's module names whatever else is on sys.path (an editable install's finder included)."""

    def find_spec(self, name, path=None, target=None):
        if name in BLOCKED:
            raise ModuleNotFoundError(f"{name} is blocked in this test", name=name)
        return None


def isolate(project: Path) -> None:
    project = project.resolve()
    sys.path[:] = [p for p in sys.path if not (p and Path(p).resolve() == project) and p not in ("", ".")]
    sys.meta_path.insert(0, _Refuse())
    for name in BLOCKED:
        sys.modules.pop(name, None)
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise AssertionError(f"{name} is importable in the isolated process")


def origin(obj) -> dict:
    cls = obj if isinstance(obj, type) else type(obj)
    return {"name": cls.__name__, "module": cls.__module__}


def video_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def write_clip(path: Path) -> str:
    """A 2-second h264 mp4 of 50 noise frames, 64x48, written with PyAV (the project's test kits are blocked here)."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for image in np.random.default_rng(3).integers(0, 256, (50, 48, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return str(path)


def check_full(repo: str, src: str, work: str) -> dict:
    """A converted repo loaded every way a user loads one (the Auto classes, both pipelines), answering, then saved
    with save_pretrained and loaded again."""
    import numpy as np
    import torch
    from PIL import Image
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageTextToText,
        AutoModelForMultimodalLM,
        AutoProcessor,
        pipeline,
    )

    out = {}
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(8, 54, 54, 3), dtype=np.uint8)  # [T, H, W, 3] uint8

    config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    out["config"] = origin(config)
    model, info = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, output_loading_info=True)
    model.eval()
    out["model"] = origin(model)
    out["loading_info"] = {
        key: sorted(map(str, value))
        for key, value in info.items()
        if key in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    base, base_info = AutoModel.from_pretrained(repo, trust_remote_code=True, output_loading_info=True)
    out["base_model"] = origin(base)
    out["base_loading_info"] = {
        key: sorted(map(str, value)) for key, value in base_info.items() if key in ("missing_keys", "unexpected_keys")
    }
    out["multimodal_lm"] = origin(AutoModelForMultimodalLM.from_pretrained(repo, trust_remote_code=True))
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    out["processor"] = origin(processor)
    geometry = ("video_pooling_mode", "nsp_keep_ratio", "nsp_padding", "nsp_partial_windows", "video_newline_position")
    out["processor_geometry"] = {name: getattr(processor, name) for name in geometry}
    out["config_geometry"] = {name: getattr(config, name) for name in geometry}

    # generate answers a question about a video
    inputs = processor(
        text=video_prompt(processor, "what is happening in this video?"), videos=[frames], return_tensors="pt"
    )
    out["video_placeholders"] = int((inputs["input_ids"] == config.video_token_id).sum())
    out["expected_placeholders"] = processor.num_video_tokens(len(frames))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        logits = model(**inputs).logits
    out["video_new_tokens"] = int(generated.shape[1] - inputs["input_ids"].shape[1])
    out["video_answer"] = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    # a video file decodes through the repo's own reader (video_stgridpool, a relative import of the processor)
    clip = write_clip(Path(work) / "clip.mp4")
    out["file_frames"] = list(
        processor(text="<video>", videos=[clip], return_tensors="pt")["pixel_values_videos"].shape
    )
    out["readers"] = sorted(name for name in sys.modules if name.endswith("video_stgridpool"))
    out["file_num_frames"] = processor.video_processor.num_frames

    # the image-text-to-text pipeline answers about a PIL image
    image = Image.fromarray(frames[0])
    pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    out["image_pipeline_model"] = origin(pipe.model)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is in the image?"}],
        }
    ]
    result = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    out["image_pipeline_answer"] = result[0]["generated_text"]

    # the any-to-any pipeline answers about a video given as decoded frames
    pipe = pipeline("any-to-any", model=repo, trust_remote_code=True)
    out["video_pipeline_model"] = origin(pipe.model)
    seen = []  # frames of each video the pipeline's model pooled: proof the video reached the model
    get_video_features = pipe.model.model.get_video_features
    pipe.model.model.get_video_features = lambda pixels, *a, **k: (
        seen.append(pixels.shape[1]) or get_video_features(pixels, *a, **k)
    )
    messages = [
        {
            "role": "user",
            "content": [{"type": "video", "video": frames}, {"type": "text", "text": "what is happening?"}],
        }
    ]
    result = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    out["video_pipeline_answer"] = result[0]["generated_text"]
    out["video_pipeline_frames_seen"] = seen

    # save_pretrained of what remote code loaded writes a repo that loads again the same way
    resaved = Path(work) / "resaved"
    model.save_pretrained(resaved)
    processor.save_pretrained(resaved)
    out["resaved_files"] = sorted(p.name for p in resaved.iterdir())
    out["resaved_auto_map"] = json.loads((resaved / "config.json").read_text())["auto_map"]
    config2 = AutoConfig.from_pretrained(resaved, trust_remote_code=True)
    model2 = AutoModelForImageTextToText.from_pretrained(resaved, trust_remote_code=True).eval()
    processor2 = AutoProcessor.from_pretrained(resaved, trust_remote_code=True)
    out["resaved_config"] = origin(config2)
    out["resaved_model"] = origin(model2)
    out["resaved_processor"] = origin(processor2)
    out["resaved_processor_geometry"] = {name: getattr(processor2, name) for name in geometry}
    inputs2 = processor2(
        text=video_prompt(processor2, "what is happening in this video?"), videos=[frames], return_tensors="pt"
    )
    with torch.no_grad():
        logits2 = model2(**inputs2).logits
    out["resaved_same_inputs"] = bool(torch.equal(inputs["input_ids"], inputs2["input_ids"]))
    out["resaved_logits_max_diff"] = float((logits - logits2).abs().max())
    return out


def compare_with_stock(repo: str, src: str, work: str) -> dict:
    """Logits of the converted repo (remote code) and of stock LLaVA-OneVision loaded from SRC, on one video."""
    import numpy as np
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
    )

    frames = np.random.default_rng(1).integers(0, 256, size=(6, 54, 54, 3), dtype=np.uint8)
    ours = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
    stock = LlavaOnevisionForConditionalGeneration.from_pretrained(src).eval()
    ours_processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    stock_processor = LlavaOnevisionProcessor.from_pretrained(src)
    ours_inputs = ours_processor(
        text=video_prompt(ours_processor, "describe the video"), videos=[frames], return_tensors="pt"
    )
    stock_inputs = stock_processor(
        text=video_prompt(stock_processor, "describe the video"), videos=[frames], return_tensors="pt"
    )
    with torch.no_grad():
        ours_logits = ours(**ours_inputs).logits
        stock_logits = stock(**stock_inputs).logits
    return {
        "model": origin(ours),
        "same_input_ids": bool(torch.equal(ours_inputs["input_ids"], stock_inputs["input_ids"])),
        "same_pixels": bool(torch.equal(ours_inputs["pixel_values_videos"], stock_inputs["pixel_values_videos"])),
        "logits_max_diff": float((ours_logits - stock_logits).abs().max()),
        "logits_shape": list(ours_logits.shape),
    }


def original_reference(src: str, config: dict, pixel_values_videos):
    """The original LLaVA-NeXT video path, written out from its source (not from this project), on SRC's own tensors:
    SigLIP tower without its last layer (already dropped in SRC) -> last hidden state -> mm_projector (Linear, GELU,
    Linear) -> 2x2 average pooling per frame (get_2dPool) -> a newline after each row of each frame
    (add_token_per_grid)."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers import SiglipVisionConfig, SiglipVisionModel

    tensors = {}
    for shard in sorted(Path(src).glob("*.safetensors")):
        tensors.update(load_file(shard))
    tower = SiglipVisionModel(SiglipVisionConfig(**config["vision_config"])).eval()
    # SigLIP's own parameter names: under `vision_model.` in some Transformers versions, not in others
    inner = "vision_model." if next(iter(tower.state_dict())).startswith("vision_model.") else ""
    tower_prefix = "model.vision_tower.vision_tower."
    tower_state = {}
    for key, value in tensors.items():
        if key.startswith(tower_prefix):
            tower_state[inner + key[len(tower_prefix) :].removeprefix("vision_model.")] = value
    tower.load_state_dict(tower_state, strict=True)
    with torch.no_grad():
        frames = pixel_values_videos[0]  # one video: [T, 3, H, W]
        hidden = tower(frames, output_hidden_states=True).hidden_states[-1]
        projected = F.linear(hidden, tensors["model.mm_projector.0.weight"], tensors["model.mm_projector.0.bias"])
        projected = F.linear(
            F.gelu(projected), tensors["model.mm_projector.2.weight"], tensors["model.mm_projector.2.bias"]
        )
        num_frames, num_tokens, dim = projected.shape
        side = int(num_tokens**0.5)
        # get_2dPool, mode "average", stride 2
        grid = projected.view(num_frames, side, side, dim).permute(0, 3, 1, 2)
        pooled = F.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(num_frames, -1, dim)
        # add_token_per_grid
        resize_h = int(pooled.shape[1] ** 0.5)
        feature = pooled.view(num_frames, 1, resize_h, resize_h, -1).permute(4, 0, 2, 1, 3).contiguous()
        feature = feature.flatten(1, 2).flatten(2, 3)
        newline = tensors["model.image_newline"]
        feature = torch.cat((feature, newline[:, None, None].expand(*feature.shape[:-1], 1)), dim=-1)
        return feature.flatten(1, 2).transpose(0, 1)


def check_original(repo: str, src: str, work: str) -> dict:
    """A repo converted from an original LLaVA-NeXT checkpoint: loads, counts agree, generates; in `average` mode its
    video features equal the original forward's."""
    import numpy as np
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    config = json.loads((Path(repo) / "config.json").read_text())
    model, info = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, output_loading_info=True)
    model.eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    frames = np.random.default_rng(2).integers(0, 256, size=(5, 54, 54, 3), dtype=np.uint8)
    inputs = processor(
        text=video_prompt(processor, "what is happening in this video?"), videos=[frames], return_tensors="pt"
    )
    out = {
        "model": origin(model),
        "processor": origin(processor),
        "loading_info": {
            key: sorted(map(str, value))
            for key, value in info.items()
            if key in ("missing_keys", "unexpected_keys", "mismatched_keys")
        },
        "video_placeholders": int((inputs["input_ids"] == config["video_token_index"]).sum()),
        "processor_num_frames": processor.video_processor.num_frames,
    }
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        if config["video_pooling_mode"] == "average":
            ours = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0]
            reference = original_reference(src, config, inputs["pixel_values_videos"])
            out["features_shape"] = list(ours.shape)
            out["reference_shape"] = list(reference.shape)
            out["features_max_diff"] = float((ours - reference).abs().max()) if ours.shape == reference.shape else None
    out["video_new_tokens"] = int(generated.shape[1] - inputs["input_ids"].shape[1])
    return out


def check_pipeline(repo: str, src: str, work: str) -> dict:
    """The image-text-to-text pipeline on a repo as a user names it (a Hub id: resolved from the Hub cache)."""
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=repo, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(54, 54, 3), dtype=np.uint8))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}]}
    ]
    result = pipe(text=messages, max_new_tokens=3, return_full_text=False)
    return {
        "model": origin(pipe.model),
        "processor": origin(pipe.processor),
        "name_or_path": pipe.model.config.name_or_path,
        "answer": result[0]["generated_text"],
    }


CHECKS = {"full": check_full, "stock": compare_with_stock, "original": check_original, "pipeline": check_pipeline}

if __name__ == "__main__":
    isolate(Path(sys.argv[1]))
    results = {}
    for job in json.loads(sys.argv[2]):
        results[job["name"]] = CHECKS[job["check"]](job["repo"], job["src"], job["work"])
    print("RESULT " + json.dumps(results))
