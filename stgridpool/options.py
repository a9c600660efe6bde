"""Text -> ST-GridPool setting values: the one parser of the converter's options and the lmms-eval model's args.

Imports nothing heavy (no torch, no Transformers), so a command line can use it as an argparse `type`. Values are
only parsed here; `VideoPoolingSettings` (configuration_stgridpool) validates them.
"""

import json
from fractions import Fraction

NUMBER_FIELDS = ("nsp_keep_ratio", "nsp_temperature", "nsp_norm_p")
PYRAMID_ALLOWED = (
    "comma-separated GROUP:STRIDE pairs of positive integers (e.g. 4:2,4:4,4:8), JSON like [[4,2],[4,4]], or none"
)


def parse_number(text: str, label: str = "value") -> float:
    """`0.25`, `1/9`, `2` -> float. ValueError naming `label` for anything else, or a number too large for a float."""
    try:
        number = float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{label}={text!r} is invalid: not a number; allowed are numbers like 0.25 or 1/9") from None
    except OverflowError:
        raise ValueError(
            f"{label}={text!r} is invalid: too large for a float; allowed are finite numbers like 0.25 or 1/9"
        ) from None
    return number


def parse_pyramid_levels(text: str, label: str = "pyramid_levels") -> list[list[int]]:
    """`4:2,4:4,4:8` or `[[4,2],[4,4],[4,8]]` -> [[4, 2], [4, 4], [4, 8]]; `none` or an empty string -> [] (no PTG).

    Only the form is checked here (pairs of integers); `VideoPoolingSettings` checks the values."""
    text = str(text).strip()
    if text.lower() in ("none", ""):
        return []
    if text.startswith("["):
        try:
            levels = json.loads(text)
        except json.JSONDecodeError:
            raise ValueError(f"{label}={text!r} is invalid: not valid JSON; allowed are {PYRAMID_ALLOWED}") from None
        return levels
    levels = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise ValueError(
                f"{label}={text!r} is invalid: level {item.strip()!r} is not GROUP:STRIDE; allowed are "
                f"{PYRAMID_ALLOWED}"
            )
        levels.append([int(part) for part in parts])
    return levels


BOOLEANS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def parse_bool(value, label: str) -> bool:
    """`true`/`false`, `yes`/`no`, `on`/`off`, `1`/`0` in any case (also a bool, or the integer 1 or 0, as lmms-eval
    types `1`) -> bool. ValueError naming `label` for anything else: a non-empty word is not True."""
    if isinstance(value, bool):
        return value
    word = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if word not in BOOLEANS:
        raise ValueError(f"{label}={value!r} is invalid: allowed are true/false, yes/no, on/off or 1/0 (any case)")
    return BOOLEANS[word]


def parse_setting(field: str, value, label: str | None = None):
    """One ST-GridPool setting (a `VideoPoolingSettings` field name) from text, e.g. a command-line or
    `--model_args` value. Values that already have a non-string type pass through (validated later), except the
    boolean `nsp_partial_windows`, which `parse_bool` takes strictly whatever its type.

    `label` is how the input is named in the error (default: the field name), e.g. `--keep-ratio`."""
    label = label or field
    if field == "nsp_partial_windows":
        return parse_bool(value, label)
    if not isinstance(value, str):
        if field == "nsp_padding" and isinstance(value, float) and value.is_integer():
            return int(value)  # lmms-eval types `1.0` as a float
        return value
    if field == "pyramid_levels":
        return parse_pyramid_levels(value, label)
    if field in NUMBER_FIELDS:
        return parse_number(value, label)
    if field == "nsp_padding":
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{label}={value!r} is invalid: allowed are integers >= 0")
        return int(text)
    return value.strip()  # video_pooling_mode, video_newline_position: checked against their lists by the settings
