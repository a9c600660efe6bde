"""stgridpool.streaming: a video's features encoded while it decodes equal those of the whole path (processor, then
`get_video_features`), generate answers alike from them, the reader's errors reach the caller; and the prompt's ids
made from a frame count equal the processor's."""

import inspect
import threading
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import gray_frames, textured_frames, write_clip
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import stgridpool.streaming
from modeling_stgridpool_llava import STGridPoolLlavaOnevisionForConditionalGeneration
from processing_stgridpool import STGridPoolProcessor
from stgridpool.prompt import video_question_inputs, video_question_text_inputs
from stgridpool.streaming import encode_video_while_decoding
from video_stgridpool import VideoDecodeError, read_video_pyav

GENERATE_TAKES_ENCODER_OUTPUTS = (
    "mm_encoder_outputs" in inspect.signature(LlavaOnevisionForConditionalGeneration.forward).parameters
)
needs_encoder_outputs = pytest.mark.skipif(
    not GENERATE_TAKES_ENCODER_OUTPUTS, reason="this Transformers' generate does not take mm_encoder_outputs"
)
QUESTION = "what is happening in this video ?"


@pytest.fixture(scope="module")
def model(tiny_stock_dir):
    return STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(tiny_stock_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_stock_dir):
    return STGridPoolProcessor.from_pretrained(tiny_stock_dir)  # stores num_frames=8


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    """A clip decoded by seeking (mp4, keyframes, B-frames), one decoded forward (AVI), and a variable-frame-rate one
    in which 5 instants show frame 3 four times."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "mp4": write_clip(folder / "clip.mp4", textured_frames(60), bframes=2, gop=12),
        "avi": write_clip(folder / "clip.avi", textured_frames(60), bframes=2, gop=12),
        "vfr": write_clip(
            folder / "vfr.mkv", gray_frames(range(10, 70, 10)), pts=[0, 1, 2, 3, 40, 41], time_base=Fraction(1, 10)
        ),
    }


@needs_encoder_outputs
@pytest.mark.parametrize(
    "clip, num_frames, chunk_frames",
    [("mp4", None, 1), ("mp4", None, 3), ("mp4", None, 100), ("avi", None, 3), ("vfr", 5, 2)],
)
def test_streamed_features_equal_the_whole_path(model, processor, clips, clip, num_frames, chunk_frames):
    """The processor's pixels for the same file (by default its stored num_frames) through `get_video_features`."""
    path = clips[clip]
    features, metadata = encode_video_while_decoding(
        model, processor, path, num_frames=num_frames, chunk_frames=chunk_frames
    )
    sampling = {} if num_frames is None else dict(num_frames=num_frames, do_sample_frames=True)
    pixels = processor.video_processor(videos=[str(path)], return_tensors="pt", **sampling)["pixel_values_videos"]
    with torch.no_grad():
        expected = model.model.get_video_features(pixels).pooler_output
    if clip == "vfr":
        assert list(metadata.frames_indices) == [0, 3, 3, 3, 3]
    assert len(metadata.frames_indices) == pixels.shape[1] == (num_frames or 8)
    assert features.shape == expected.shape and features.dtype == model.dtype
    torch.testing.assert_close(features, expected)


@needs_encoder_outputs
def test_generate_from_streamed_features_answers_as_from_frames(model, processor, clips):
    """Greedy generate: the same tokens, and the same logits at each step (a random model's tokens alone say little)."""
    features, metadata = encode_video_while_decoding(model, processor, clips["mp4"], chunk_frames=3)
    frames = read_video_pyav(clips["mp4"], num_frames=8)[0]
    greedy = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_logits=True)
    inputs = video_question_inputs(processor, frames, QUESTION, do_sample_frames=False)
    expected = model.generate(**inputs, **greedy)
    text = video_question_text_inputs(processor, len(metadata.frames_indices), QUESTION)
    video = BaseModelOutputWithPooling(pooler_output=features)
    streamed = model.generate(**text, mm_encoder_outputs={"video": video}, **greedy)
    assert torch.equal(
        streamed.sequences[:, text["input_ids"].shape[1] :], expected.sequences[:, inputs["input_ids"].shape[1] :]
    )
    torch.testing.assert_close(torch.stack(streamed.logits), torch.stack(expected.logits))


@needs_encoder_outputs
def test_errors_reach_the_caller_and_the_reader_thread_ends(model, processor, clips, tmp_path, monkeypatch):
    """The reader's error, before any frame or after some, is raised in the caller as the reader raised it; so is
    the encoder's; the reader thread has ended each time."""
    (tmp_path / "notes.txt").write_text("not a video")
    with pytest.raises(VideoDecodeError) as expected:
        read_video_pyav(tmp_path / "notes.txt")
    before = threading.active_count()
    with pytest.raises(VideoDecodeError) as raised:
        encode_video_while_decoding(model, processor, tmp_path / "notes.txt")
    assert str(raised.value) == str(expected.value) and threading.active_count() == before

    def fails_after_two_frames(source, num_frames, on_frame):
        for row in range(2):
            on_frame([row], np.zeros((48, 64, 3), np.uint8))
        raise VideoDecodeError(f"{source}: damaged or truncated: decoding stopped after frame 1")

    with monkeypatch.context() as patch:
        patch.setattr(stgridpool.streaming, "read_video_pyav", fails_after_two_frames)
        with pytest.raises(VideoDecodeError, match=r"^x.mp4: damaged or truncated: decoding stopped after frame 1$"):
            encode_video_while_decoding(model, processor, "x.mp4", chunk_frames=1)
    assert threading.active_count() == before

    def fails(pixels):
        raise RuntimeError("the vision tower failed")

    monkeypatch.setattr(model.model, "project_video_frames", fails)
    with pytest.raises(RuntimeError, match="^the vision tower failed$"):
        encode_video_while_decoding(model, processor, clips["mp4"])
    assert threading.active_count() == before


@pytest.mark.skipif(GENERATE_TAKES_ENCODER_OUTPUTS, reason="this Transformers' generate takes mm_encoder_outputs")
def test_without_encoder_outputs_a_one_line_error_names_the_version(model, processor, clips):
    import transformers

    with pytest.raises(RuntimeError) as info:
        encode_video_while_decoding(model, processor, clips["mp4"])
    message = str(info.value)
    assert "mm_encoder_outputs" in message and transformers.__version__ in message and "\n" not in message


@pytest.mark.parametrize("settings", [{}, {"video_newline_position": "grid", "video_pooling_mode": "average"}])
def test_text_inputs_from_a_count_equal_the_processors(tiny_stock_dir, settings):
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, **settings)
    for num_frames in (1, 4, 9):
        frames = np.zeros((num_frames, 54, 54, 3), np.uint8)
        for question in (QUESTION, "what is the <video> tag used in <image> <|im_end|>"):
            expected = video_question_inputs(processor, frames, question, do_sample_frames=False)
            inputs = video_question_text_inputs(processor, num_frames, question)
            assert set(inputs) == {"input_ids", "attention_mask"}
            assert torch.equal(inputs["input_ids"], expected["input_ids"]), (num_frames, question)
            assert torch.equal(inputs["attention_mask"], expected["attention_mask"])
