"""STGridPoolConfig: defaults, round trip, and the exact error for each invalid value."""

import json

import pytest
from huggingface_hub.errors import StrictDataclassError

from configuration_stgridpool import STGridPoolConfig

ALLOWED_LEVELS = "a list of [group_size, stride] pairs of positive integers, e.g. [[4, 2], [4, 4], [4, 8]], or []"


def test_defaults_are_the_papers():
    config = STGridPoolConfig()
    assert config.model_type == "stgridpool_llava_onevision"
    assert config.video_pooling_mode == "stgridpool"
    assert config.pyramid_levels == [[4, 2], [4, 4], [4, 8]]
    assert (config.nsp_keep_ratio, config.nsp_temperature, config.nsp_norm_p) == (0.25, 1.0, 2.0)
    assert (config.nsp_padding, config.nsp_partial_windows) == (0, False)
    assert config.video_newline_position == "one_token"
    assert config.pooled_frame_size == (13, 13)


def test_round_trip(tmp_path):
    settings = dict(
        video_pooling_mode="average",
        pyramid_levels=[[2, 3], [6, 1]],
        nsp_keep_ratio=1 / 9,
        nsp_temperature=0.5,
        nsp_norm_p=1.0,
        nsp_padding=2,
        nsp_partial_windows=True,
        video_newline_position="grid",
    )
    STGridPoolConfig(**settings).save_pretrained(tmp_path)
    loaded = STGridPoolConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in settings} == settings
    assert STGridPoolConfig.from_pretrained(tmp_path, pyramid_levels=[]).pyramid_levels == []


@pytest.mark.parametrize(
    "field,value,message",
    [
        (
            "pyramid_levels",
            [[0, 2]],
            f"pyramid_levels=[[0, 2]] is invalid: level [0, 2] has group size 0; allowed is {ALLOWED_LEVELS}",
        ),
        (
            "pyramid_levels",
            [[4, -1]],
            f"pyramid_levels=[[4, -1]] is invalid: level [4, -1] has stride -1; allowed is {ALLOWED_LEVELS}",
        ),
        (
            "pyramid_levels",
            [[4]],
            f"pyramid_levels=[[4]] is invalid: level [4] is not a pair; allowed is {ALLOWED_LEVELS}",
        ),
        (
            "nsp_keep_ratio",
            0.3,
            "nsp_keep_ratio=0.3 is invalid: allowed values are 1/k^2 for an integer k (1.0, 0.25, 1/9, 0.0625, ...); "
            "the nearest is 1/2^2 = 0.25",
        ),
        ("nsp_keep_ratio", 0, "nsp_keep_ratio=0 is invalid: allowed values are 1/k^2 (1.0, 0.25, 1/9, 0.0625, ...)"),
        ("nsp_temperature", 0.0, "nsp_temperature=0.0 is invalid: allowed values are finite numbers > 0"),
        ("nsp_temperature", -1.0, "nsp_temperature=-1.0 is invalid: allowed values are finite numbers > 0"),
        ("nsp_temperature", float("inf"), "nsp_temperature=inf is invalid: allowed values are finite numbers > 0"),
        ("nsp_temperature", float("nan"), "nsp_temperature=nan is invalid: allowed values are finite numbers > 0"),
        ("nsp_norm_p", 0, "nsp_norm_p=0 is invalid: allowed values are numbers > 0 (2 is the L2 norm)"),
        ("nsp_padding", -1, "nsp_padding=-1 is invalid: allowed values are integers >= 0"),
        (
            "video_pooling_mode",
            "max",
            "video_pooling_mode='max' is invalid: allowed values are ('stgridpool', 'bilinear', 'average')",
        ),
        (
            "video_newline_position",
            "row",
            "video_newline_position='row' is invalid: allowed values are ('one_token', 'grid', 'frame', 'none')",
        ),
        (
            "nsp_keep_ratio",
            1 / 28**2,
            "nsp_keep_ratio=0.0012755102040816326 is invalid: its 28x28 window is larger than the padded frame "
            "(27 + 2*nsp_padding=0 = 27 tokens a side); allowed are windows of at most 27 tokens a side",
        ),
    ],
)
def test_invalid_value_is_refused_with_its_exact_error(field, value, message):
    # Loading (from_pretrained / from_dict, what the CLI, converter and lmms-eval use): the settings' ValueError.
    with pytest.raises(ValueError) as error:
        STGridPoolConfig.from_dict({field: value})
    assert str(error.value) == message
    # Constructing: `@strict` refuses it, with the same words where the field has its own check.
    with pytest.raises(StrictDataclassError) as error:
        STGridPoolConfig(**{field: value})
    assert field in str(error.value)
    if field not in ("video_pooling_mode", "video_newline_position"):  # Literal fields: `@strict`'s own message
        assert message in str(error.value)


def test_padding_makes_room_for_a_larger_window():
    assert STGridPoolConfig(nsp_keep_ratio=1 / 29**2, nsp_padding=1).pooled_frame_size == (1, 1)


def test_overrides_at_load_time_are_checked_too(tmp_path):
    STGridPoolConfig().save_pretrained(tmp_path)
    assert STGridPoolConfig.from_pretrained(tmp_path, nsp_keep_ratio=1 / 9).pooled_frame_size == (9, 9)
    with pytest.raises(ValueError, match=r"level \[0, 1\] has group size 0"):
        STGridPoolConfig.from_pretrained(tmp_path, pyramid_levels=[[4, 2], [0, 1]])
    config = STGridPoolConfig()
    with pytest.raises(StrictDataclassError, match="nsp_padding=-2 is invalid"):
        config.nsp_padding = -2


@pytest.mark.parametrize(
    "field,value",
    [("nsp_padding", -2), ("nsp_keep_ratio", 0.3), ("nsp_temperature", float("nan")), ("video_pooling_mode", "max"),
     ("pyramid_levels", [[0, 2]]), ("pyramid_levels", {}), ("pooling_backend", "cuda")],
)  # fmt: skip
def test_refused_assignment_leaves_the_old_value_and_is_never_saved(tmp_path, field, value):
    """Issue 12 item 18."""
    config = STGridPoolConfig()
    before = getattr(config, field)
    with pytest.raises(StrictDataclassError):
        setattr(config, field, value)
    assert getattr(config, field) == before
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get(field, before) == before


def test_a_combination_is_checked_before_save():
    """An assignment valid alone but not with the others (window larger than the frame) is refused at save time."""
    config = STGridPoolConfig()
    config.nsp_keep_ratio = 1 / 28**2
    with pytest.raises(StrictDataclassError, match="window is larger than the padded frame"):
        config.validate()


@pytest.mark.parametrize("order", ["ratio_first", "padding_first"])
def test_overrides_are_validated_as_one_combination(tmp_path, order):
    """Issue 12 item 19: 1/900 (a 30x30 window) needs padding 2 on 27-token frames, whatever the keyword order."""
    STGridPoolConfig().save_pretrained(tmp_path)
    overrides = dict(nsp_keep_ratio=1 / 900, nsp_padding=2)
    if order == "padding_first":
        overrides = dict(reversed(list(overrides.items())))
    config = STGridPoolConfig.from_pretrained(tmp_path, **overrides)
    assert (config.nsp_keep_ratio, config.nsp_padding, config.pooled_frame_size) == (1 / 900, 2, (1, 1))
    with pytest.raises(ValueError, match="30x30 window is larger than the padded frame"):
        STGridPoolConfig.from_pretrained(tmp_path, nsp_keep_ratio=1 / 900)


def test_pyramid_none_is_the_default_everywhere_and_empty_dict_is_refused(tmp_path):
    """Issue 12 item 21."""
    STGridPoolConfig(pyramid_levels=[[2, 1]]).save_pretrained(tmp_path)
    assert STGridPoolConfig(pyramid_levels=None).pyramid_levels == [[4, 2], [4, 4], [4, 8]]
    assert STGridPoolConfig.from_pretrained(tmp_path, pyramid_levels=None).pyramid_levels == [[4, 2], [4, 4], [4, 8]]
    with pytest.raises(ValueError, match=r"pyramid_levels=\{\} is invalid"):
        STGridPoolConfig.from_pretrained(tmp_path, pyramid_levels={})
    with pytest.raises(StrictDataclassError):
        STGridPoolConfig(pyramid_levels={})


def test_huge_temperature_is_a_value_error_not_an_overflow():
    """Issue 12 item 20: 10**400 cannot be a float; the refusal names it."""
    with pytest.raises(ValueError, match=r"nsp_temperature=100000000000\.\.\.\(401 digits\) is invalid"):
        STGridPoolConfig.from_dict({"nsp_temperature": 10**400})
