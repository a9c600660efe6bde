"""The Hub model card (README.md) of a converted repo."""

import json

import yaml

CITATION = """@inproceedings{luo2026stgridpool,
  title     = {Enhancing Visual Token Representations for Video Large Language Models via Training-free Spatial-Temporal Pooling and Gridding},
  author    = {Luo and Wang and Chen and Ding},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2026},
  eprint    = {2605.22078},
  archivePrefix = {arXiv}
}"""
TAGS = ["stgridpool", "llava-onevision", "video-text-to-text", "video-llm", "training-free", "custom_code"]
# License fields of the source card carried over as they are.
LICENSE_KEYS = ("license", "license_name", "license_link")


def card_metadata(source_metadata: dict, base_model: str | None) -> dict:
    """YAML metadata: base model, library, pipeline, tags, and the source card's license if it has one."""
    metadata = {}
    if base_model:
        metadata["base_model"] = base_model
    metadata["library_name"] = "transformers"
    metadata["pipeline_tag"] = "image-text-to-text"
    for key in LICENSE_KEYS:
        if key in source_metadata:
            metadata[key] = source_metadata[key]
    for key in ("language", "datasets"):
        if key in source_metadata:
            metadata[key] = source_metadata[key]
    metadata["tags"] = TAGS
    return metadata


def model_card(
    source_metadata: dict, base_model: str | None, settings: dict, repo_id: str | None, source_name: str = ""
) -> str:
    """README.md text: YAML front matter, the settings used, how to load the model, the citation."""
    metadata = yaml.safe_dump(card_metadata(source_metadata, base_model), sort_keys=False, allow_unicode=True)
    name = repo_id or "path/to/this/repo"
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A LLaVA-OneVision checkpoint"
    rows = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings.items())
    return f"""---
{metadata}---

# ST-GridPool: {base_model or source_name or "LLaVA-OneVision"}

{base} with **ST-GridPool** (ICLR 2026), a training-free replacement for LLaVA-OneVision's per-frame 2x2
video-token pooling: Pyramid Temporal Gridding (PTG) gives the language model multi-grained temporal context,
then Norm-based Spatial Pooling (NSP) pools each frame's tokens weighted by their norms. The weights are the
base model's, unchanged; only the video path differs (images and text are stock). The code ships in this repo,
so loading needs `trust_remote_code=True`.

## ST-GridPool settings

| field | value |
|---|---|
{rows}

Change them at load time, e.g. `AutoConfig.from_pretrained(repo, trust_remote_code=True, video_pooling_mode="bilinear")`
(`"bilinear"` is stock LLaVA-OneVision), and give the processor the same geometry fields.

## Usage

```python
import numpy as np
from transformers import AutoModelForImageTextToText, AutoProcessor

repo = "{name}"
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True, dtype="auto", device_map="auto")
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)

video = np.zeros((32, 384, 384, 3), dtype=np.uint8)  # your frames: [T, H, W, 3] uint8
conversation = [{{"role": "user", "content": [{{"type": "video"}}, {{"type": "text", "text": "What happens in this video?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(text=prompt, videos=[video], return_tensors="pt").to(model.device, model.dtype)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Pipelines work too: `pipeline("image-text-to-text", model=repo, trust_remote_code=True)`.

## Citation

```bibtex
{CITATION}
```
"""
