"""Model inputs for one video and one user question, where the question is only ever text: from the frames
(`video_question_inputs`, the processor's), or from their count alone for a video already encoded
(`video_question_text_inputs`); and where the processors run (`processor_device`).

A processor expands every `<video>` / `<image>` it finds in the prompt, and a tokenizer turns `<|im_end|>` written in
text into the special token, so a question that mentions them ("How is the <video> tag used in HTML?") would add a
placeholder, or end the turn. Here the chat template is rendered around a marker; the processor sees only the
template's own text (with its one `<video>`), and the question is tokenized on its own with special tokens split
into plain text, then spliced in where the marker was.
"""

import torch
from transformers import BatchFeature

MARKER = "\ue000stgridpool-question\ue000"  # private-use characters: no template or tokenizer produces them


def processor_device(model) -> torch.device:
    """Where the processors resize and normalise frames (the `device=` of Transformers' fast image and video
    processors): the model's device when it is a CUDA GPU, where this is several times faster than on the CPU and
    the pixels are already where the model reads them; anywhere else the CPU, as stock Transformers does. A model
    spread over devices (`device_map`) gives its first one, where its inputs go."""
    device = torch.device(model.device)
    return device if device.type == "cuda" else torch.device("cpu")


def video_question_inputs(processor, frames, question: str, **processor_kwargs):
    """Processor inputs (`input_ids`, `attention_mask`, `pixel_values_videos`, ...: batch of one, PyTorch) for
    `frames` (uint8 [T, H, W, 3], already sampled) and `question`.

    The only `<video>` placeholders are those the template puts there, expanded to the model's token count; every
    character of `question` is text."""

    def media_inputs(text: str):
        return processor(text=text, videos=[frames], add_special_tokens=False, return_tensors="pt", **processor_kwargs)

    return _question_inputs(processor, question, media_inputs)


def video_question_text_inputs(processor, num_frames: int, question: str) -> BatchFeature:
    """`input_ids` and `attention_mask` ([1, L], PyTorch) for a video of `num_frames` frames and `question`, without
    pixels: the ids `video_question_inputs` makes for those frames, for a model given the video's features
    already encoded (`mm_encoder_outputs`). `processor`: an `STGridPoolProcessor` (it counts the placeholders)."""
    placeholders = processor.video_token * processor.num_video_tokens(num_frames)

    def media_inputs(text: str):
        ids = processor.tokenizer(text.replace(processor.video_token, placeholders), add_special_tokens=False)
        return BatchFeature({"input_ids": torch.tensor([ids["input_ids"]], dtype=torch.long)})

    return _question_inputs(processor, question, media_inputs)


def _question_inputs(processor, question: str, media_inputs) -> BatchFeature:
    """The template around `question`, its media part (the side of the question holding the template's `<video>`)
    turned into inputs by `media_inputs(text)`, which expands the placeholders; the question's ids spliced in."""
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": MARKER}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    if prompt.count(MARKER) != 1:
        raise ValueError(f"the chat template renders the question {prompt.count(MARKER)} times; allowed is once")
    before, after = prompt.split(MARKER)
    tokenizer = processor.tokenizer
    media_first = processor.video_token in before

    def text_ids(text: str, split_special_tokens: bool = False) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special_tokens)["input_ids"]

    inputs = media_inputs(before if media_first else after)
    media_ids = inputs["input_ids"][0].tolist()
    question_ids = text_ids(question, split_special_tokens=True)
    if media_first:
        ids = media_ids + question_ids + text_ids(after)
    else:
        ids = text_ids(before) + question_ids + media_ids
    inputs["input_ids"] = torch.tensor([ids], dtype=torch.long)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    return inputs
