"""The model and processor subclasses against the stock LLaVA-OneVision classes (SPEC.md section 3)."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import GenerationMixin, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
from transformers.utils import logging as transformers_logging

from configuration_stgridpool import STGridPoolConfig
from modeling_stgridpool_llava import (
    _TRANSFORMERS_5_17,
    STGridPoolLlavaOnevisionForConditionalGeneration,
    add_video_newlines,
    average_pool,
    pool_video,
    st_grid_pool,
)
from processing_stgridpool import STGridPoolProcessor
from stgridpool.tiny import build_tiny_processor, build_tiny_tokenizer, tiny_config_kwargs

MODES = ("stgridpool", "bilinear", "average")
NEWLINES = ("one_token", "grid", "frame", "none")


def random_video(num_frames, height=40, width=50, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (num_frames, height, width, 3), dtype=np.uint8)


def chat(processor, *contents, **kwargs):
    messages = [{"role": "user", "content": [*contents, {"type": "text", "text": "what is happening"}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, **kwargs)


@pytest.fixture(scope="module")
def stock(tiny_stock_dir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_stock_dir).eval()


@pytest.fixture(scope="module")
def stock_processor(tiny_stock_dir):
    return LlavaOnevisionProcessor.from_pretrained(tiny_stock_dir)


def load_ours(tiny_stock_dir, **settings):
    model, info = STGridPoolLlavaOnevisionForConditionalGeneration.from_pretrained(
        tiny_stock_dir, output_loading_info=True, **settings
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def test_stock_checkpoint_loads_with_every_weight(tiny_stock_dir, stock):
    ours = load_ours(tiny_stock_dir)
    assert isinstance(ours.config, STGridPoolConfig)
    stock_state = stock.state_dict()
    assert ours.state_dict().keys() == stock_state.keys()
    assert all(torch.equal(value, stock_state[name]) for name, value in ours.state_dict().items())


@pytest.mark.parametrize("kind", ["video", "image", "text"])
def test_bilinear_mode_equals_stock(tiny_stock_dir, stock, stock_processor, kind):
    ours = load_ours(tiny_stock_dir, video_pooling_mode="bilinear")
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, video_pooling_mode="bilinear")
    media = {
        "video": dict(videos=[random_video(6)]),
        "image": dict(images=[Image.fromarray(random_video(1, 60, 90)[0])]),
        "text": {},
    }[kind]
    content = [] if kind == "text" else [{"type": kind}]
    inputs = processor(text=chat(processor, *content), return_tensors="pt", **media)
    stock_inputs = stock_processor(text=chat(stock_processor, *content), return_tensors="pt", **media)
    assert torch.equal(inputs["input_ids"], stock_inputs["input_ids"])
    with torch.no_grad():
        ours_out, stock_out = ours(**inputs), stock(**inputs)
    assert (ours_out.logits - stock_out.logits).abs().max() <= 1e-5
    # The same output fields as stock (video_outputs on 5.24, video_hidden_states on 5.17), filled alike.
    assert type(ours_out) is type(stock_out) and list(ours_out.keys()) == list(stock_out.keys())


def hidden_states_kept(output) -> int:
    return sum(state is not None for state in output.hidden_states or ())


def test_get_video_features_follows_the_stock_contract(tiny_stock_dir, stock):
    """Issue 11: a tuple with return_dict=False, the stock fields, and no more vision layers kept than stock."""
    ours = load_ours(tiny_stock_dir)
    pixels = torch.randn(2, 3, 3, 54, 54)
    with torch.no_grad():
        ours_out, stock_out = ours.model.get_video_features(pixels), stock.model.get_video_features(pixels)
        ours_tuple = ours.model.get_video_features(pixels, return_dict=False)
        stock_tuple = stock.model.get_video_features(pixels, return_dict=False)
        via_generation_class = ours.get_video_features(pixels, return_dict=False)
    assert type(ours_out) is type(stock_out) and list(ours_out.keys()) == list(stock_out.keys())
    assert isinstance(ours_tuple, tuple) and isinstance(stock_tuple, tuple) and len(ours_tuple) == len(stock_tuple)
    assert isinstance(via_generation_class, tuple)
    assert torch.equal(ours_tuple[list(ours_out.keys()).index("pooler_output")], ours_out.pooler_output)
    assert 1 <= hidden_states_kept(ours_out) <= hidden_states_kept(stock_out)
    # The config's return_dict is honoured as stock does.
    ours.config.return_dict = False
    try:
        with torch.no_grad():
            assert isinstance(ours.model.get_video_features(pixels), tuple)
    finally:
        ours.config.return_dict = True


def test_get_video_features_keeps_only_the_vision_layer_it_uses(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir)
    layers = ours.config.vision_config.num_hidden_layers + 1
    with torch.no_grad():
        kept = hidden_states_kept(ours.model.get_video_features(torch.randn(1, 2, 3, 54, 54)))
    assert kept == (layers if _TRANSFORMERS_5_17 else 1)  # 5.17's stock tower cannot select layers
    # A caller asking for every hidden state still gets them.
    with torch.no_grad():
        every = ours.model.get_video_features(torch.randn(1, 2, 3, 54, 54), output_hidden_states=True)
    assert hidden_states_kept(every) == layers


def test_project_video_frames_is_the_path_get_video_features_pools(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir, video_pooling_mode="average", video_newline_position="none")
    pixels = torch.randn(2, 3, 3, 54, 54)
    with torch.no_grad():
        frames = ours.model.project_video_frames(pixels)
        features = ours.model.get_video_features(pixels).pooler_output
        hidden = ours.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
    assert frames.shape == (2, 3, 27, 27, 32)
    torch.testing.assert_close(frames, ours.model.multi_modal_projector(hidden).reshape(2, 3, 27, 27, -1))
    torch.testing.assert_close(features, average_pool(frames.flatten(0, 1)).reshape(2, -1, 32))


def test_generation_class_lists_generation_mixin():
    assert GenerationMixin in STGridPoolLlavaOnevisionForConditionalGeneration.__bases__


def test_loading_a_stock_checkpoint_does_not_warn(tiny_stock_dir):
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = transformers_logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        load_ours(tiny_stock_dir)
        STGridPoolConfig.from_pretrained(tiny_stock_dir)
    finally:
        logger.removeHandler(handler)
    assert not [
        r for r in records if "another model type" in r.getMessage() or "instantiate a model of type" in r.getMessage()
    ]


def test_stgridpool_features_are_st_grid_pool_of_each_videos_projection(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir, pyramid_levels=[[2, 1], [4, 2]])
    config = ours.config
    pixels = torch.randn(2, 9, 3, 54, 54)
    with torch.no_grad():
        features = ours.get_video_features(pixels).pooler_output
        hidden = ours.model.vision_tower(pixels.flatten(0, 1), output_hidden_states=True).hidden_states[-1]
        projected = ours.model.multi_modal_projector(hidden).reshape(2, 9, 27, 27, -1)
    for video, video_features in zip(projected, features):
        pooled = st_grid_pool(video, pyramid_levels=config.pyramid_levels, keep_ratio=config.nsp_keep_ratio)
        expected = add_video_newlines(pooled, ours.model.image_newline, "one_token")
        assert video_features.shape == (9 * 13 * 13 + 1, 32)
        assert torch.allclose(video_features, expected, atol=1e-6)
    # Each video is pooled on its own: the second video's features do not depend on the first's frames.
    with torch.no_grad():
        alone = ours.get_video_features(pixels[1:]).pooler_output
    assert torch.allclose(alone[0], features[1], atol=1e-6)


SWEEP_FRAME_SIZE = 7  # odd, like 27, and small so forward passes stay quick
SWEEP = [(mode, newline) for mode in MODES for newline in NEWLINES]


@pytest.fixture(scope="module")
def sweep_tokenizer():
    return build_tiny_tokenizer()


def sweep_processor(tokenizer, mode, newline):
    return build_tiny_processor(
        tokenizer, SWEEP_FRAME_SIZE, processor_class=STGridPoolProcessor,
        video_pooling_mode=mode, video_newline_position=newline,
    )  # fmt: skip


@pytest.mark.parametrize("mode,newline", SWEEP)
def test_processor_count_equals_model_geometry_for_every_frame_count(sweep_tokenizer, mode, newline):
    """T = 1..70 for each mode x newline position, without forward passes: the processor's count, the settings'
    count and the length of what the model's pooling and layout functions make, all equal."""
    processor = sweep_processor(sweep_tokenizer, mode, newline)
    settings = STGridPoolConfig(video_pooling_mode=mode, video_newline_position=newline).video_pooling
    side = SWEEP_FRAME_SIZE
    for num_frames in range(1, 71):
        pooled = pool_video(torch.zeros(num_frames, side, side, 1), settings)
        made = add_video_newlines(pooled, torch.zeros(1), newline).shape[0]
        count = processor.num_video_tokens(num_frames)
        assert count == settings.num_tokens(num_frames, side, side) == made, (mode, newline, num_frames)
        assert processor._get_num_multimodal_tokens(video_sizes=[(num_frames, 14, 14)]).num_video_tokens == [count]
    text = chat(processor, {"type": "video"})
    for num_frames in (1, 8, 33, 70):  # the prompt itself, at a few counts
        inputs = processor(text=text, videos=[random_video(num_frames, 14, 14, seed=num_frames)], return_tensors="pt")
        assert int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids("<video>")).sum()) == (
            processor.num_video_tokens(num_frames)
        )


def _forward_sweep(tokenizer, frame_counts):
    torch.manual_seed(0)
    model = STGridPoolLlavaOnevisionForConditionalGeneration(
        STGridPoolConfig(**tiny_config_kwargs(tokenizer, SWEEP_FRAME_SIZE))
    ).eval()
    for mode, newline in SWEEP:
        model.config.video_pooling_mode = mode
        model.config.video_newline_position = newline
        processor = sweep_processor(tokenizer, mode, newline)
        text = chat(processor, {"type": "video"})
        for num_frames in frame_counts:
            video = random_video(num_frames, 14, 14, seed=num_frames)
            inputs = processor(text=text, videos=[video], return_tensors="pt")
            num_placeholders = int((inputs["input_ids"] == model.config.video_token_id).sum())
            assert num_placeholders == processor.num_video_tokens(num_frames)
            with torch.no_grad():
                features = model.get_video_features(inputs["pixel_values_videos"]).pooler_output
                assert features.shape[1] == num_placeholders, (mode, newline, num_frames)
                logits = model(**inputs).logits
            assert logits.shape[1] == inputs["input_ids"].shape[1]


def test_placeholders_equal_features_in_a_few_forward_passes(sweep_tokenizer):
    """Every mode x newline position, forward passes at two frame counts (no PTG level, and two levels)."""
    _forward_sweep(sweep_tokenizer, (1, 17))


@pytest.mark.slow_sweep
@pytest.mark.parametrize("first", range(1, 71, 10), ids=lambda first: f"T{first}-{first + 9}")
def test_placeholders_equal_features_for_every_mode_newline_and_frame_count(sweep_tokenizer, first):
    """The full sweep: T = 1..70 x 4 newline positions x 3 modes, 840 forward passes (`pytest -m slow_sweep`), in
    chunks of 10 frame counts that pytest-xdist can share among workers."""
    _forward_sweep(sweep_tokenizer, range(first, first + 10))


@pytest.mark.parametrize(
    "settings",
    [dict(nsp_keep_ratio=1 / 9, nsp_padding=1), dict(nsp_partial_windows=True), dict(nsp_keep_ratio=1.0)],
    ids=["3x3-pad1", "partial", "no-pooling"],
)
def test_other_nsp_geometries_agree_with_the_processor(tiny_stock_dir, settings):
    ours = load_ours(tiny_stock_dir, **settings)
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, **settings)
    for num_frames in (1, 8, 17):
        inputs = processor(
            text=chat(processor, {"type": "video"}), videos=[random_video(num_frames)], return_tensors="pt"
        )
        with torch.no_grad():
            assert ours(**inputs).logits.isfinite().all()


def test_processor_saves_and_reloads_its_settings(tiny_stock_dir, tmp_path):
    settings = dict(video_pooling_mode="average", nsp_keep_ratio=1 / 9, nsp_padding=1, nsp_partial_windows=True,
                    video_newline_position="grid")  # fmt: skip
    STGridPoolProcessor.from_pretrained(tiny_stock_dir, **settings).save_pretrained(tmp_path)
    reloaded = STGridPoolProcessor.from_pretrained(tmp_path)
    assert {k: getattr(reloaded, k) for k in settings} == settings
    # The stock arguments survive the round trip too (Transformers rebuilds processors from __init__'s signature).
    assert reloaded.num_image_tokens == 27 * 27
    assert reloaded.vision_feature_select_strategy == "full"
    assert reloaded.chat_template is not None


def test_processor_rejects_bad_settings(tiny_stock_dir):
    with pytest.raises(ValueError, match=r"video_newline_position='row' is invalid"):
        STGridPoolProcessor.from_pretrained(tiny_stock_dir, video_newline_position="row")


def test_mismatch_error_names_the_settings_that_differ(tiny_stock_dir, stock_processor):
    ours = load_ours(tiny_stock_dir)
    inputs = stock_processor(
        text=chat(stock_processor, {"type": "video"}), videos=[random_video(4)], return_tensors="pt"
    )
    with pytest.raises(ValueError) as error:
        ours(**inputs)
    message = str(error.value)
    assert "785 <video> placeholder tokens" in message  # 4 * 14 * 14 + 1, the stock count
    assert "video_pooling_mode='bilinear' (model: 'stgridpool')" in message
    assert "nsp_partial_windows=True (model: False)" in message


@pytest.mark.parametrize(
    "processor_settings,named,not_named",
    [
        (dict(nsp_keep_ratio=1 / 25), "nsp_keep_ratio=0.04 (model: 0.25)", "nsp_padding="),
        (dict(nsp_padding=3), "nsp_padding=3 (model: 0)", "nsp_partial_windows="),
    ],
    ids=["keep-ratio-1/25", "padding-3"],
)
def test_mismatch_error_derives_the_processor_settings(tiny_stock_dir, processor_settings, named, not_named):
    """Issue 12 item 24: the differing settings are worked out from the counts, not picked from a few candidates."""
    ours = load_ours(tiny_stock_dir)
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir, **processor_settings)
    inputs = processor(text=chat(processor, {"type": "video"}), videos=[random_video(4)], return_tensors="pt")
    with pytest.raises(ValueError) as error:
        ours(**inputs)
    message = str(error.value)
    assert named in message and not_named not in message, message


def test_generate_on_a_video_a_batch_of_two_and_an_image_with_a_video(tiny_stock_dir):
    ours = load_ours(tiny_stock_dir)
    processor = STGridPoolProcessor.from_pretrained(tiny_stock_dir)
    image = Image.fromarray(random_video(1, 60, 90, seed=3)[0])
    cases = {
        "one video": dict(text=[chat(processor, {"type": "video"})], videos=[random_video(8)]),
        "two videos": dict(
            text=[chat(processor, {"type": "video"}), chat(processor, {"type": "video"}) + " describe"],
            videos=[random_video(8, seed=1), random_video(8, seed=2)],
            padding=True,
        ),
        "image and video": dict(
            text=[chat(processor, {"type": "image"}, {"type": "video"})], images=[image], videos=[random_video(8)]
        ),
    }
    for name, kwargs in cases.items():
        inputs = processor(return_tensors="pt", **kwargs)
        out = ours.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        assert out.shape == (len(kwargs["text"]), inputs["input_ids"].shape[1] + 4), name
    # Greedy decoding of one video alone and inside the batch agrees (videos are pooled independently).
    single = processor(text=[chat(processor, {"type": "video"})], videos=[random_video(8, seed=1)], return_tensors="pt")
    batch = processor(return_tensors="pt", **cases["two videos"])
    alone = ours.generate(**single, max_new_tokens=4, do_sample=False)[0, -4:]
    batched = ours.generate(**batch, max_new_tokens=4, do_sample=False)[0, -4:]
    assert torch.equal(alone, batched)
