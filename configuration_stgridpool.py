"""ST-GridPool configuration: LLaVA-OneVision's config plus the video-pooling settings.

Each setting has one check (`FIELD_CHECKS`; ValueError naming the field, the value and what is allowed), run where a
value enters: on a config's construction and field assignment (`@strict`) and a `VideoPoolingSettings`'s
construction; the one check across fields, that the NSP window fits the padded frame, runs once on the combination.
Past that the values travel as they are: the geometry helpers (`window_size`, `pooled_frame_size`,
`video_token_count`) and the model's pooling check nothing again. The helpers are the one place that says how many
tokens a video becomes; the model and the processor both use them, so the two cannot disagree for the same settings.
They are plain Python: no torch needed.
"""

import dataclasses
import math
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, LlavaOnevisionConfig

PoolingMode = Literal["stgridpool", "bilinear", "average"]
NewlinePosition = Literal["one_token", "grid", "frame", "none"]
PoolingBackend = Literal["auto", "torch", "triton"]
POOLING_MODES = get_args(PoolingMode)
NEWLINE_POSITIONS = get_args(NewlinePosition)
POOLING_BACKENDS = get_args(PoolingBackend)
# The paper's pyramid: (group size, stride) per level, applied in order.
DEFAULT_PYRAMID_LEVELS = ((4, 2), (4, 4), (4, 8))
STGRIDPOOL_FIELDS = (
    "video_pooling_mode",
    "pyramid_levels",
    "nsp_keep_ratio",
    "nsp_temperature",
    "nsp_norm_p",
    "nsp_padding",
    "nsp_partial_windows",
    "video_newline_position",
)
# The fields that fix how many tokens a video becomes: the processor takes these too, under the same names.
GEOMETRY_FIELDS = (
    "video_pooling_mode",
    "nsp_keep_ratio",
    "nsp_padding",
    "nsp_partial_windows",
    "video_newline_position",
)


# ---------------------------------------------------------------------------------------------------------------
# One check per field, run where a value enters
# ---------------------------------------------------------------------------------------------------------------


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (10**400)
        return False


def _short(value) -> str:
    """repr of `value`, shortened for huge ints (10**400 has 401 digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} digits)"


def check_pooling_mode(value) -> None:
    if value not in POOLING_MODES:
        raise ValueError(f"video_pooling_mode={value!r} is invalid: allowed values are {POOLING_MODES}")


def validate_pyramid_levels(pyramid_levels) -> tuple[tuple[int, int], ...]:
    """Check `pyramid_levels` is a sequence of (group size, stride) pairs of positive ints; return it as tuples."""
    allowed = "a list of [group_size, stride] pairs of positive integers, e.g. [[4, 2], [4, 4], [4, 8]], or []"
    if not isinstance(pyramid_levels, (list, tuple)):  # not a dict, set, string or generator: order matters
        raise ValueError(f"pyramid_levels={pyramid_levels!r} is invalid: allowed is {allowed}")
    levels = []
    for level in pyramid_levels:
        if not isinstance(level, (list, tuple)) or len(level) != 2:
            raise ValueError(
                f"pyramid_levels={pyramid_levels!r} is invalid: level {level!r} is not a pair; allowed is {allowed}"
            )
        for name, value in zip(("group size", "stride"), level):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"pyramid_levels={pyramid_levels!r} is invalid: level {list(level)!r} has {name} {value!r}; "
                    f"allowed is {allowed}"
                )
        levels.append((level[0], level[1]))
    return tuple(levels)


def _check_pyramid_levels(value) -> None:
    if value is not None:  # None: the paper's pyramid
        validate_pyramid_levels(value)


def check_keep_ratio(value) -> None:
    """Allowed: 1/k^2 for a positive integer k (1.0, 0.25, 1/9, ...): NSP's k x k window keeps one token in k^2."""
    if not _is_number(value) or not 0 < value <= 1:
        raise ValueError(
            f"nsp_keep_ratio={_short(value)} is invalid: allowed values are 1/k^2 (1.0, 0.25, 1/9, 0.0625, ...)"
        )
    k = window_size(value)
    if not math.isclose(value, 1 / k**2, rel_tol=1e-6):
        raise ValueError(
            f"nsp_keep_ratio={value!r} is invalid: allowed values are 1/k^2 for an integer k "
            f"(1.0, 0.25, 1/9, 0.0625, ...); the nearest is 1/{k}^2 = {1 / k**2:g}"
        )


def check_temperature(value) -> None:
    if not _is_number(value) or not (_finite(value) and value > 0):
        raise ValueError(f"nsp_temperature={_short(value)} is invalid: allowed values are finite numbers > 0")


def check_norm_p(value) -> None:
    if not _is_number(value) or not value > 0:
        raise ValueError(f"nsp_norm_p={_short(value)} is invalid: allowed values are numbers > 0 (2 is the L2 norm)")


def check_padding(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"nsp_padding={value!r} is invalid: allowed values are integers >= 0")


def check_partial_windows(value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"nsp_partial_windows={value!r} is invalid: allowed values are True or False")


def check_newline_position(value) -> None:
    if value not in NEWLINE_POSITIONS:
        raise ValueError(f"video_newline_position={value!r} is invalid: allowed values are {NEWLINE_POSITIONS}")


def check_pooling_backend(value, name: str = "pooling_backend") -> None:
    """Allowed: one of POOLING_BACKENDS ("torch" forces the plain PyTorch path)."""
    if value not in POOLING_BACKENDS:
        raise ValueError(f"{name}={value!r} is invalid: allowed values are {POOLING_BACKENDS}")


FIELD_CHECKS = {
    "video_pooling_mode": check_pooling_mode,
    "pyramid_levels": _check_pyramid_levels,
    "nsp_keep_ratio": check_keep_ratio,
    "nsp_temperature": check_temperature,
    "nsp_norm_p": check_norm_p,
    "nsp_padding": check_padding,
    "nsp_partial_windows": check_partial_windows,
    "video_newline_position": check_newline_position,
}


def check_window_fits(keep_ratio: float, padding: int, frame_size: int) -> None:
    """The check across fields: NSP's window must fit a frame of `frame_size` tokens a side (27 for SigLIP-384/14;
    the shorter side of a frame that is not square) padded by `padding` on every side."""
    k, padded = window_size(keep_ratio), frame_size + 2 * padding
    if k > padded:
        raise ValueError(
            f"nsp_keep_ratio={keep_ratio!r} is invalid: its {k}x{k} window is larger than the padded frame "
            f"({frame_size} + 2*nsp_padding={padding} = {padded} tokens a side); "
            f"allowed are windows of at most {padded} tokens a side"
        )


# ---------------------------------------------------------------------------------------------------------------
# Geometry: arithmetic on validated values
# ---------------------------------------------------------------------------------------------------------------


def window_size(keep_ratio: float) -> int:
    """NSP window side k of a keep ratio 1/k^2 (0.25 -> 2, 1/9 -> 3, 1.0 -> 1)."""
    return round(1 / math.sqrt(keep_ratio))


def pooled_frame_size(
    height: int,
    width: int,
    *,
    video_pooling_mode: str = "stgridpool",
    nsp_keep_ratio: float = 0.25,
    nsp_padding: int = 0,
    nsp_partial_windows: bool = False,
) -> tuple[int, int]:
    """Rows and columns (Ho, Wo) one frame of `height x width` tokens is pooled to (paper: "Norm-based Spatial
    Pooling")."""
    if video_pooling_mode == "bilinear":
        return math.ceil(height / 2), math.ceil(width / 2)
    if video_pooling_mode == "average":
        return height // 2, width // 2
    k = window_size(nsp_keep_ratio)
    padded_h, padded_w = height + 2 * nsp_padding, width + 2 * nsp_padding
    if nsp_partial_windows:
        return math.ceil(padded_h / k), math.ceil(padded_w / k)
    return (padded_h - k) // k + 1, (padded_w - k) // k + 1


def video_token_count(num_frames: int, pooled_height: int, pooled_width: int, video_newline_position: str) -> int:
    """Tokens one video of `num_frames` pooled `pooled_height x pooled_width` frames takes (the only place this count
    is written)."""
    newlines = {"one_token": 1, "grid": num_frames * pooled_height, "frame": num_frames, "none": 0}
    return num_frames * pooled_height * pooled_width + newlines[video_newline_position]


def geometry_of(settings) -> dict:
    """The `GEOMETRY_FIELDS` of `settings` (a config, a `VideoPoolingSettings`, a processor): what fixes counts."""
    return {name: getattr(settings, name) for name in GEOMETRY_FIELDS}


def pooled_size_of(settings, height: int, width: int) -> tuple[int, int]:
    """(Ho, Wo) one `height x width` frame of tokens is pooled to under `settings` (any object holding the
    `GEOMETRY_FIELDS`, e.g. a config), computed from its validated values."""
    window = {name: getattr(settings, name) for name in GEOMETRY_FIELDS if name != "video_newline_position"}
    return pooled_frame_size(height, width, **window)


@dataclasses.dataclass(frozen=True)
class VideoPoolingSettings:
    """The ST-GridPool settings as one validated value, under the config's field names.

    Every consumer (config, model, processor, CLI, visualize, converter, lmms-eval model, vLLM plugin) passes this
    object instead of fanning out the fields. Constructing it validates every field (ValueError naming the field,
    the value and what is allowed); `check_frame_size` adds the window-fits check once the frame size is known.
    """

    video_pooling_mode: str = "stgridpool"
    pyramid_levels: tuple[tuple[int, int], ...] = DEFAULT_PYRAMID_LEVELS
    nsp_keep_ratio: float = 0.25
    nsp_temperature: float = 1.0
    nsp_norm_p: float = 2.0
    nsp_padding: int = 0
    nsp_partial_windows: bool = False
    video_newline_position: str = "one_token"

    def __post_init__(self):
        for name, check in FIELD_CHECKS.items():
            check(getattr(self, name))
        levels = self.pyramid_levels
        levels = DEFAULT_PYRAMID_LEVELS if levels is None else tuple((group, stride) for group, stride in levels)
        object.__setattr__(self, "pyramid_levels", levels)

    @classmethod
    def from_config(cls, source) -> "VideoPoolingSettings":
        """The settings held by `source`: a config, a processor, a dict or any object with (some of) the fields;
        missing fields take their defaults."""
        get = source.get if isinstance(source, dict) else lambda name, default: getattr(source, name, default)
        defaults = cls()
        return cls(**{name: get(name, getattr(defaults, name)) for name in STGRIDPOOL_FIELDS})

    def to_kwargs(self) -> dict:
        """The fields as JSON-friendly keyword arguments (pyramid levels as lists), e.g. for a config."""
        kwargs = {name: getattr(self, name) for name in STGRIDPOOL_FIELDS}
        kwargs["pyramid_levels"] = [list(level) for level in self.pyramid_levels]
        return kwargs

    def geometry(self) -> dict:
        """The fields that fix how many tokens a video becomes (`GEOMETRY_FIELDS`): what a processor needs."""
        return geometry_of(self)

    def replace(self, **changes) -> "VideoPoolingSettings":
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def window_size(self) -> int:
        """NSP window side k (keep ratio 1/k^2)."""
        return window_size(self.nsp_keep_ratio)

    def check_frame_size(self, frame_size: int) -> None:
        """Raise ValueError if the NSP window does not fit a padded frame of `frame_size` tokens a side."""
        check_window_fits(self.nsp_keep_ratio, self.nsp_padding, frame_size)

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """(Ho, Wo): the grid one `height x width` frame of tokens is pooled to."""
        return pooled_size_of(self, height, width)

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Language-model tokens one video of `num_frames` frames of `height x width` tokens becomes."""
        return video_token_count(num_frames, *self.pooled_size(height, width), self.video_newline_position)


_OWN_FIELDS = (*STGRIDPOOL_FIELDS, "pooling_backend")


def _field(check, default):
    """A dataclass field whose value `check` validates on construction and on every assignment (`@strict`)."""
    return validated_field(check, default=default)


@strict
class STGridPoolConfig(LlavaOnevisionConfig):
    r"""LLaVA-OneVision config with ST-GridPool's video pooling (ICLR 2026).

    video_pooling_mode (`str`, defaults to `"stgridpool"`):
        `"stgridpool"`: PTG then NSP (the paper). `"bilinear"`: stock LLaVA-OneVision (2x down-scale, 27 -> 14).
        `"average"`: stock LLaVA-Video (2x2 average pooling, 27 -> 13). The stock modes skip PTG.
    pyramid_levels (`list[list[int]]`, defaults to `[[4, 2], [4, 4], [4, 8]]`):
        PTG levels `(group size g, stride s)` in order: every `s`-th frame is sampled and each run of `g`
        sampled frames is tiled into one summary frame. `[]` disables PTG (the paper's "w/o PTG" ablation).
    nsp_keep_ratio (`float`, defaults to 0.25):
        Fraction of a frame's tokens NSP keeps, `1/k^2` for a `k x k` window (paper: 0.25, k = 2).
    nsp_temperature (`float`, defaults to 1.0):
        tau, multiplies the token-norm scores before the window softmax; larger is closer to max-norm picking.
    nsp_norm_p (`float`, defaults to 2.0):
        p of the p-norm that scores tokens (paper: L2).
    nsp_padding (`int`, defaults to 0):
        Zero tokens added on every side of a frame before windowing.
    nsp_partial_windows (`bool`, defaults to False):
        This project's extension: also pool the border windows that do not fill `k x k` (27 -> 14 with k = 2,
        the stock token budget) instead of dropping them (27 -> 13, the paper).
    video_newline_position (`str`, defaults to `"one_token"`):
        Where `image_newline` goes: `"one_token"` after the video (LLaVA-OneVision), `"grid"` after each row of
        each frame (LLaVA-Video), `"frame"` after each frame, `"none"` nowhere.
    pooling_backend (`str`, defaults to `"auto"`):
        `"auto"`: the fused Triton kernels on CUDA where they apply, else plain PyTorch; the kernels have no
        backward, so wherever a gradient is needed (fine-tuning) the PyTorch path runs. `"torch"`: always plain
        PyTorch (e.g. if a Triton release misbehaves). `"triton"`: always the kernels (CUDA tensors only; refused
        where a gradient is needed).

    Invalid values are refused where they enter (constructor, assignment, `from_pretrained` overrides), naming
    the field, the value and what is allowed; a refused assignment leaves the old value.
    """

    model_type = "stgridpool_llava_onevision"

    # Each field's check (FIELD_CHECKS) runs after @strict's type check. The modes are plain `str` and the pyramid
    # `Any` so that a wrong mode or a dict of levels gets the check's words (what is allowed), not a type error.
    video_pooling_mode: str = _field(check_pooling_mode, "stgridpool")
    pyramid_levels: Any = _field(_check_pyramid_levels, None)
    nsp_keep_ratio: float | int = _field(check_keep_ratio, 0.25)
    nsp_temperature: float | int = _field(check_temperature, 1.0)
    nsp_norm_p: float | int = _field(check_norm_p, 2.0)
    nsp_padding: int = _field(check_padding, 0)
    nsp_partial_windows: bool = _field(check_partial_windows, False)
    video_newline_position: str = _field(check_newline_position, "one_token")
    pooling_backend: str = _field(check_pooling_backend, "auto")

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a stock llava_onevision config.json says "llava_onevision"; this is ours
        levels = DEFAULT_PYRAMID_LEVELS if self.pyramid_levels is None else self.pyramid_levels
        self.pyramid_levels = [list(level) for level in levels]  # JSON-friendly lists, whatever sequences came in
        super().__post_init__(**kwargs)

    def validate_video_pooling(self) -> None:
        """The check across fields: the NSP window fits the padded frame (`@strict` runs this after construction and
        before `save_pretrained` writes; each field was checked where it was set)."""
        check_window_fits(self.nsp_keep_ratio, self.nsp_padding, self.frame_size)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        # A stock llava-onevision config.json is this config without the ST-GridPool fields (their defaults apply):
        # read it as ours, so loading one does not warn that another model type is being used.
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == "llava_onevision":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        # `from_pretrained(repo, nsp_keep_ratio=..., nsp_padding=...)`: the ST-GridPool overrides join the saved
        # values before the config is built (stock sets them one by one afterwards), so the combination is checked
        # once, whatever the keyword order. A refusal is the check's own ValueError, as loading tools expect.
        overrides = {name: kwargs.pop(name) for name in _OWN_FIELDS if name in kwargs}
        try:
            return super().from_dict({**config_dict, **overrides}, **kwargs)
        except StrictDataclassError as error:
            if isinstance(error.__cause__, ValueError) and str(error.__cause__).startswith(_OWN_FIELDS):
                raise error.__cause__ from None
            raise

    @property
    def video_pooling(self) -> VideoPoolingSettings:
        """The ST-GridPool settings as one `VideoPoolingSettings` (built on each access, for tools that pass the
        settings around; the model pools with the config's own values)."""
        return VideoPoolingSettings.from_config(self)

    @property
    def frame_size(self) -> int:
        """Tokens per side of one frame as it leaves the projector (27 for SigLIP-384/14)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def pooled_frame_size(self) -> tuple[int, int]:
        """(Ho, Wo): the grid one frame is pooled to under these settings."""
        return pooled_size_of(self, self.frame_size, self.frame_size)


# So AutoConfig (which AutoTokenizer and AutoProcessor consult) knows the model type of a repo saved by these classes.
AutoConfig.register(STGridPoolConfig.model_type, STGridPoolConfig, exist_ok=True)

__all__ = ["STGridPoolConfig", "VideoPoolingSettings"]
