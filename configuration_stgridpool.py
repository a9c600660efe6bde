"""ST-GridPool configuration: LLaVA-OneVision's config plus the video-pooling settings.

The geometry helpers here (`window_size`, `pooled_frame_size`, `video_token_count`) are the one
place that says how many tokens a video becomes; the model and the processor both use them, so
the two cannot disagree for the same settings. They are plain Python: no torch needed.
"""

import dataclasses
import math
from typing import Literal, get_args

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


def window_size(keep_ratio: float) -> int:
    """NSP window side k for a keep ratio r = 1/k^2 (0.25 -> 2, 1/9 -> 3, 1.0 -> 1).

    Raises ValueError for any ratio that is not 1/k^2 for a positive integer k.
    """
    if not _is_number(keep_ratio) or not 0 < keep_ratio <= 1:
        raise ValueError(
            f"nsp_keep_ratio={_short(keep_ratio)} is invalid: allowed values are 1/k^2 (1.0, 0.25, 1/9, 0.0625, ...)"
        )
    k = round(1 / math.sqrt(keep_ratio))
    if not math.isclose(keep_ratio, 1 / k**2, rel_tol=1e-6):
        raise ValueError(
            f"nsp_keep_ratio={keep_ratio!r} is invalid: allowed values are 1/k^2 for an integer k "
            f"(1.0, 0.25, 1/9, 0.0625, ...); the nearest is 1/{k}^2 = {1 / k**2:g}"
        )
    return k


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
    frame_tokens = pooled_height * pooled_width
    if video_newline_position == "one_token":
        return num_frames * frame_tokens + 1
    if video_newline_position == "grid":
        return num_frames * pooled_height * (pooled_width + 1)
    if video_newline_position == "frame":
        return num_frames * (frame_tokens + 1)
    if video_newline_position == "none":
        return num_frames * frame_tokens
    raise ValueError(
        f"video_newline_position={video_newline_position!r} is invalid: allowed values are {NEWLINE_POSITIONS}"
    )


def check_pooling_backend(backend: str, name: str = "pooling_backend") -> None:
    """Raise ValueError unless `backend` is one of POOLING_BACKENDS ("torch" forces the plain PyTorch path)."""
    if backend not in POOLING_BACKENDS:
        raise ValueError(f"{name}={backend!r} is invalid: allowed values are {POOLING_BACKENDS}")


def validate_video_geometry(
    *,
    video_pooling_mode: str,
    nsp_keep_ratio: float,
    nsp_padding: int,
    nsp_partial_windows: bool,
    video_newline_position: str,
    frame_size: int | None = None,
) -> None:
    """Raise ValueError naming the field, the value and what is allowed, for the settings that fix token counts.

    Shared by the config and the processor so both refuse the same values with the same words.
    `frame_size` (tokens per frame side, 27 for SigLIP-384/14) enables the window-fits check.
    """
    if video_pooling_mode not in POOLING_MODES:
        raise ValueError(f"video_pooling_mode={video_pooling_mode!r} is invalid: allowed values are {POOLING_MODES}")
    if video_newline_position not in NEWLINE_POSITIONS:
        raise ValueError(
            f"video_newline_position={video_newline_position!r} is invalid: allowed values are {NEWLINE_POSITIONS}"
        )
    k = window_size(nsp_keep_ratio)
    if isinstance(nsp_padding, bool) or not isinstance(nsp_padding, int) or nsp_padding < 0:
        raise ValueError(f"nsp_padding={nsp_padding!r} is invalid: allowed values are integers >= 0")
    if not isinstance(nsp_partial_windows, bool):
        raise ValueError(f"nsp_partial_windows={nsp_partial_windows!r} is invalid: allowed values are True or False")
    if frame_size is not None and k > frame_size + 2 * nsp_padding:
        raise ValueError(
            f"nsp_keep_ratio={nsp_keep_ratio!r} is invalid: its {k}x{k} window is larger than the padded frame "
            f"({frame_size} + 2*nsp_padding={nsp_padding} = {frame_size + 2 * nsp_padding} tokens a side); "
            f"allowed are windows of at most {frame_size + 2 * nsp_padding} tokens a side"
        )


def validate_pooling_scalars(*, nsp_temperature: float, nsp_norm_p: float) -> None:
    """Raise ValueError naming the field, the value and what is allowed, for NSP's temperature and norm p."""
    if not _is_number(nsp_temperature) or not (_finite(nsp_temperature) and nsp_temperature > 0):
        raise ValueError(f"nsp_temperature={_short(nsp_temperature)} is invalid: allowed values are finite numbers > 0")
    if not _is_number(nsp_norm_p) or not nsp_norm_p > 0:
        raise ValueError(
            f"nsp_norm_p={_short(nsp_norm_p)} is invalid: allowed values are numbers > 0 (2 is the L2 norm)"
        )


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
        levels = self.pyramid_levels
        object.__setattr__(
            self, "pyramid_levels", DEFAULT_PYRAMID_LEVELS if levels is None else validate_pyramid_levels(levels)
        )
        validate_pooling_scalars(nsp_temperature=self.nsp_temperature, nsp_norm_p=self.nsp_norm_p)
        validate_video_geometry(**self.geometry())

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
        return {name: getattr(self, name) for name in GEOMETRY_FIELDS}

    def replace(self, **changes) -> "VideoPoolingSettings":
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    @property
    def window_size(self) -> int:
        """NSP window side k (keep ratio 1/k^2)."""
        return window_size(self.nsp_keep_ratio)

    def check_frame_size(self, frame_size: int) -> None:
        """Raise ValueError if the NSP window does not fit a padded frame of `frame_size` tokens a side."""
        validate_video_geometry(**self.geometry(), frame_size=frame_size)

    def pooled_size(self, height: int, width: int) -> tuple[int, int]:
        """(Ho, Wo): the grid one `height x width` frame of tokens is pooled to."""
        return pooled_frame_size(
            height, width, **{k: v for k, v in self.geometry().items() if k != "video_newline_position"}
        )

    def num_tokens(self, num_frames: int, height: int, width: int) -> int:
        """Language-model tokens one video of `num_frames` frames of `height x width` tokens becomes."""
        return video_token_count(num_frames, *self.pooled_size(height, width), self.video_newline_position)

    def diff(self, other: "VideoPoolingSettings", fields=STGRIDPOOL_FIELDS) -> dict:
        """{field: (ours, theirs)} for the `fields` whose values differ."""
        return {n: (getattr(self, n), getattr(other, n)) for n in fields if getattr(self, n) != getattr(other, n)}

    def changes_giving(self, frame_size: int, num_frames: int, num_tokens: int) -> list[dict]:
        """The smallest changes of the geometry fields under which a video of `num_frames` frames of
        `frame_size` x `frame_size` tokens takes `num_tokens` tokens: [{field: (theirs, ours)}, ...], fewest fields
        changed (for the model's placeholder-mismatch message). Every mode, newline position, window, padding and
        border rule is tried (a few thousand, cheap)."""
        found, fewest = [], len(GEOMETRY_FIELDS)
        for mode in POOLING_MODES:
            if mode != "stgridpool":  # the NSP fields play no part: keep ours
                windows = [(self.nsp_keep_ratio, self.nsp_padding, self.nsp_partial_windows)]
            else:
                windows = [
                    (1.0 / k**2, padding, partial)
                    for padding in range(frame_size + 1)
                    for k in range(1, frame_size + 2 * padding + 1)
                    for partial in (False, True)
                ]
            for keep_ratio, padding, partial in windows:
                for newline in NEWLINE_POSITIONS:
                    values = dict(zip(GEOMETRY_FIELDS, (mode, keep_ratio, padding, partial, newline)))
                    window = {k: v for k, v in values.items() if k != "video_newline_position"}
                    rows, cols = pooled_frame_size(frame_size, frame_size, **window)
                    if video_token_count(num_frames, rows, cols, newline) != num_tokens:
                        continue
                    changed = self.replace(**values).diff(self, GEOMETRY_FIELDS)
                    if len(changed) < fewest:
                        found, fewest = [], len(changed)
                    if len(changed) == fewest and changed not in found:
                        found.append(changed)
        return found


def _field(check, default):
    """A dataclass field whose value `check` validates on construction and on every assignment (`@strict`)."""
    return validated_field(check, default=default)


def _check_pyramid_levels(value) -> None:
    if value is not None:  # None: the paper's pyramid
        validate_pyramid_levels(value)


def _check_keep_ratio(value) -> None:
    window_size(value)


def _check_temperature(value) -> None:
    validate_pooling_scalars(nsp_temperature=value, nsp_norm_p=2.0)


def _check_norm_p(value) -> None:
    validate_pooling_scalars(nsp_temperature=1.0, nsp_norm_p=value)


def _check_padding(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"nsp_padding={value!r} is invalid: allowed values are integers >= 0")


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

    video_pooling_mode: PoolingMode = "stgridpool"
    pyramid_levels: list | tuple | None = _field(_check_pyramid_levels, None)
    nsp_keep_ratio: float | int = _field(_check_keep_ratio, 0.25)
    nsp_temperature: float | int = _field(_check_temperature, 1.0)
    nsp_norm_p: float | int = _field(_check_norm_p, 2.0)
    nsp_padding: int = _field(_check_padding, 0)
    nsp_partial_windows: bool = False
    video_newline_position: NewlinePosition = "one_token"
    pooling_backend: PoolingBackend = "auto"

    def __post_init__(self, **kwargs):
        kwargs.pop("model_type", None)  # a stock llava_onevision config.json says "llava_onevision"; this is ours
        if self.pyramid_levels is None:
            self.pyramid_levels = [list(level) for level in DEFAULT_PYRAMID_LEVELS]
        else:  # JSON-friendly lists, whatever sequence type came in
            self.pyramid_levels = [list(level) for level in validate_pyramid_levels(self.pyramid_levels)]
        super().__post_init__(**kwargs)

    def validate_video_pooling(self) -> None:
        """All the ST-GridPool settings together, the NSP window fitting the padded frame included (`@strict` runs
        this after construction and before `save_pretrained` writes)."""
        self.video_pooling.check_frame_size(self.frame_size)

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
        # values before anything is built, so the combination is validated once, whatever the keyword order; the
        # errors are the settings' own ValueErrors. None means the default, as in the constructor.
        overrides = {name: kwargs.pop(name) for name in (*STGRIDPOOL_FIELDS, "pooling_backend") if name in kwargs}
        config_dict = {**config_dict, **overrides}
        settings = {name: config_dict[name] for name in STGRIDPOOL_FIELDS if name in config_dict}
        if settings.get("pyramid_levels", ()) is None:
            del settings["pyramid_levels"]
        VideoPoolingSettings(**settings)
        if "pooling_backend" in config_dict:
            check_pooling_backend(config_dict["pooling_backend"])
        try:
            return super().from_dict(config_dict, **kwargs)
        except StrictDataclassError as error:
            if isinstance(error.__cause__, ValueError) and "nsp_" in str(error.__cause__):  # ours: the window check
                raise error.__cause__ from None
            raise

    @property
    def video_pooling(self) -> VideoPoolingSettings:
        """The ST-GridPool settings as one validated value."""
        return VideoPoolingSettings.from_config(self)

    @property
    def frame_size(self) -> int:
        """Tokens per side of one frame as it leaves the projector (27 for SigLIP-384/14)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def pooled_frame_size(self) -> tuple[int, int]:
        """(Ho, Wo): the grid one frame is pooled to under these settings."""
        return self.video_pooling.pooled_size(self.frame_size, self.frame_size)


# So AutoConfig (which AutoTokenizer and AutoProcessor consult) knows the model type of a repo saved by these classes.
AutoConfig.register(STGridPoolConfig.model_type, STGridPoolConfig, exist_ok=True)

__all__ = ["STGridPoolConfig", "VideoPoolingSettings"]
