"""A video file to the model's video features while it decodes (issue 25): the vision tower and the projector encode
frames, a chunk at a time, as the decoder delivers them, so the GPU does not wait for the last frame; only the pooling
(PTG and NSP need every frame of the video) waits for it.

    features, metadata = encode_video_while_decoding(model, processor, "clip.mp4")
    inputs = video_question_text_inputs(processor, len(metadata.frames_indices), question).to(model.device)
    video = BaseModelOutputWithPooling(pooler_output=features)  # transformers.modeling_outputs
    output = model.generate(**inputs, mm_encoder_outputs={"video": video}, max_new_tokens=128)

The features are `model.model.get_video_features` of the processor's pixels for the same frames (up to the rounding
of a vision tower run on other batch sizes). The language model takes them through generate's `mm_encoder_outputs`,
which older Transformers (5.17) lack.
"""

import inspect
import queue
import threading

import numpy as np
import torch
import transformers
from transformers.video_utils import VideoMetadata

from stgridpool.prompt import processor_device
from video_stgridpool import DEFAULT_NUM_FRAMES, read_video_pyav


@torch.inference_mode()
def encode_video_while_decoding(
    model, processor, source, num_frames: int | None = None, chunk_frames: int = 16
) -> tuple[torch.Tensor, VideoMetadata]:
    """Decode `source` (a path or a binary file-like object, as `read_video_pyav` takes) in a background thread,
    keeping `num_frames` frames evenly spaced in time (default: the processor's stored `num_frames`, else
    DEFAULT_NUM_FRAMES), while this thread takes the decoded frames `chunk_frames` at a time through the video
    processor (on `processor_device(model)`), the vision tower and the projector; then pools them.

    model: an ST-GridPool `...ForConditionalGeneration`; processor: its `STGridPoolProcessor`. Returns (video
    features [1, N, D] on the model's device in its dtype, for `mm_encoder_outputs`, made under inference mode (no
    gradients); the reader's `VideoMetadata`).
    The reader's errors (`VideoDecodeError`, ...) are raised here as they are; the reader thread has ended whenever
    this returns or raises."""
    if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:  # the test generate itself makes
        raise RuntimeError(
            f"encode_video_while_decoding needs a Transformers version whose generate takes mm_encoder_outputs "
            f"(pre-encoded video features); the installed {transformers.__version__} does not: upgrade transformers"
        )
    if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
        raise ValueError(f"chunk_frames={chunk_frames!r} is invalid: allowed values are integers >= 1")
    if num_frames is None:
        num_frames = getattr(processor.video_processor, "num_frames", None) or DEFAULT_NUM_FRAMES
    decoded = queue.Queue()  # (rows, image) of each frame as it decodes, then None
    outcome = {}

    def read() -> None:
        try:
            outcome["metadata"] = read_video_pyav(
                source, num_frames=num_frames, on_frame=lambda rows, image: decoded.put((rows, image))
            )[1]
        except BaseException as error:  # raised again in the calling thread
            outcome["error"] = error
        finally:
            decoded.put(None)

    reader = threading.Thread(target=read, name="stgridpool-decode")
    reader.start()
    try:
        projected = _project_as_decoded(model, processor, decoded, chunk_frames)
    finally:
        reader.join()
    if "error" in outcome:
        raise outcome["error"]
    metadata = outcome["metadata"]
    frames = torch.stack([projected[row] for row in range(len(metadata.frames_indices))])
    return model.model.pool_video_frames(frames[None]), metadata


def _project_as_decoded(model, processor, decoded: queue.Queue, chunk_frames: int) -> dict[int, torch.Tensor]:
    """The projected frames [h, w, D] by row of the video, from the (rows, image uint8 [H, W, 3]) items of `decoded`
    up to None, encoded `chunk_frames` at a time (the last chunk: what is left). A row delivered again takes the
    later frame (the reader's fallback to decoding from the start delivers them again)."""
    device = processor_device(model)
    projected, chunk = {}, []
    while True:
        item = decoded.get()
        if item is not None:
            chunk.append(item)
        if chunk and (item is None or len(chunk) == chunk_frames):
            videos = [np.stack([image for _, image in chunk])]
            pixels = processor.video_processor(
                videos=videos, do_sample_frames=False, return_tensors="pt", device=device
            )["pixel_values_videos"]
            frames = model.model.project_video_frames(pixels.to(model.device, model.dtype))[0]
            for (rows, _), frame in zip(chunk, frames):
                for row in rows:
                    projected[row] = frame
            chunk = []
        if item is None:
            return projected
