"""Command line: `python -m convert SRC DST [options]` (console script `stgridpool-convert`).

Every refusal is one line on stderr naming the input, the value and what is allowed, exit code 2, and DST is left
as it was (not even created): all checks run before anything is written.
"""

import argparse
import sys
from fractions import Fraction
from pathlib import Path

from .errors import ConversionError

PROG = "stgridpool-convert"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_pyramid_levels(text: str) -> list[list[int]]:
    """`4:2,4:4,4:8` -> [[4, 2], [4, 4], [4, 8]]; `none` (or an empty string) -> [] (no PTG)."""
    if text.strip().lower() in ("none", ""):
        return []
    levels = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise argparse.ArgumentTypeError(
                f"--pyramid-levels={text!r} is invalid: level {item.strip()!r} is not GROUP:STRIDE; allowed are "
                f"comma-separated GROUP:STRIDE pairs of positive integers (e.g. 4:2,4:4,4:8) or 'none'"
            )
        levels.append([int(part) for part in parts])
    return levels


def parse_number(text: str) -> float:
    """A float, also written as a fraction (`1/9`)."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed are numbers like 0.25 or 1/9") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert a LLaVA-OneVision checkpoint (Transformers format, safetensors) into an ST-GridPool model "
        "repo that loads with trust_remote_code=True. Weights are hard-linked or copied, never loaded.",
    )
    parser.add_argument("src", metavar="SRC", help="local checkpoint directory or Hub model id (model_type llava_onevision)")
    parser.add_argument("dst", metavar="DST", help="directory to write the repo to (must be new or empty unless --overwrite)")
    group = parser.add_argument_group("ST-GridPool settings (default: the paper's)")
    group.add_argument("--video-pooling-mode", help="stgridpool (default), bilinear (stock LLaVA-OneVision) or average (stock LLaVA-Video)")
    group.add_argument("--pyramid-levels", type=parse_pyramid_levels, help="PTG levels GROUP:STRIDE,... (default 4:2,4:4,4:8); 'none' disables PTG")
    group.add_argument("--keep-ratio", type=parse_number, help="NSP keep ratio 1/k^2 (default 0.25)")
    group.add_argument("--temperature", type=parse_number, help="NSP softmax temperature > 0 (default 1.0)")
    group.add_argument("--norm-p", type=parse_number, help="p of the token-norm score (default 2)")
    group.add_argument("--padding", type=int, help="NSP zero padding per side, integer >= 0 (default 0)")
    group.add_argument(
        "--partial-windows", action=argparse.BooleanOptionalAction, default=None,
        help="also pool border windows that do not fill k x k (27 -> 14 tokens a side; default: off, 27 -> 13)",
    )  # fmt: skip
    group.add_argument("--newline-position", help="one_token (default), grid, frame or none")
    parser.add_argument("--base-model", help="Hub id for the card's base_model (default: SRC when it is a Hub id)")
    parser.add_argument("--src-revision", help="revision of SRC when it is a Hub model id")
    parser.add_argument("--copy", action="store_true", help="copy the weights instead of hard-linking them")
    parser.add_argument("--tokenizer", help="original LLaVA-NeXT SRC only: tokenizer directory or Hub id, if SRC ships none")
    parser.add_argument("--vision-config", help="original LLaVA-NeXT SRC only: JSON file with the SigLIP vision config, for a tower not known by name")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is a non-empty directory")
    hub = parser.add_argument_group("Hub upload")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the repo to this Hub model repo (created if needed)")
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument("--revision", help="branch to upload to (created if needed; default main)")
    return parser


# CLI option -> STGridPoolConfig field
OPTION_FIELDS = {
    "video_pooling_mode": "video_pooling_mode",
    "pyramid_levels": "pyramid_levels",
    "keep_ratio": "nsp_keep_ratio",
    "temperature": "nsp_temperature",
    "norm_p": "nsp_norm_p",
    "padding": "nsp_padding",
    "partial_windows": "nsp_partial_windows",
    "newline_position": "video_newline_position",
}


def chosen_settings(args: argparse.Namespace) -> dict:
    """The ST-GridPool config fields given on the command line (the others keep their defaults)."""
    return {field: getattr(args, option) for option, field in OPTION_FIELDS.items() if getattr(args, option) is not None}


def check_hub_options(args: argparse.Namespace) -> None:
    """--private and --revision need --push-to-hub; the repo id must be a valid one."""
    if args.push_to_hub is None:
        for flag, value in (("--private", args.private), ("--revision", args.revision)):
            if value:
                raise ConversionError(f"{flag}={value!r} is invalid without --push-to-hub; allowed only together with --push-to-hub REPO_ID")
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.push_to_hub)
    except HFValidationError:
        raise ConversionError(
            f"--push-to-hub={args.push_to_hub!r} is invalid: not a Hub repo id; allowed is 'name' or 'org/name' "
            f"(letters, digits, '-', '_', '.')"
        ) from None


def run(args: argparse.Namespace) -> Path:
    """Check everything, then write the repo (and push it). Raises ConversionError before writing on bad input."""
    from configuration_stgridpool import STGRIDPOOL_FIELDS

    from .card import model_card
    from .hub import push_to_hub
    from .repo import build_config, check_destination, check_processor_files, copy_stock_files, write_repo
    from .source import inspect_source

    # Cheapest checks first: building the config imports Transformers (seconds).
    check_hub_options(args)
    source = inspect_source(args.src, args.src_revision)
    dst = Path(args.dst).absolute()
    check_destination(dst, source.path, args.overwrite)
    if source.layout == "original":
        config, fill = prepare_original(source, args)
    else:
        for flag, value in (("--tokenizer", args.tokenizer), ("--vision-config", args.vision_config)):
            if value:
                raise ConversionError(f"{flag}={value!r} is invalid for a Transformers-format SRC; allowed only for original LLaVA-NeXT checkpoints")
        check_processor_files(source)
        config = build_config(source.config, chosen_settings(args))

        def fill(temp):
            copy_stock_files(source, temp, args.copy)

    settings = {name: config[name] for name in STGRIDPOOL_FIELDS}
    card = model_card(source.card_metadata, args.base_model or source.hub_id, settings, args.push_to_hub, source.path.name)
    write_repo(source.path, config, card, dst, fill, overwrite=args.overwrite)
    print(f"Wrote {dst}", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = push_to_hub(dst, args.push_to_hub, private=args.private, revision=args.revision)
        except Exception as error:  # network, auth, permissions: the repo on disk is complete; say so in one line
            reason = str(error).splitlines()[0] if str(error) else ""
            raise PushError(f"wrote {dst} but uploading it to {args.push_to_hub!r} failed ({type(error).__name__}: {reason})") from None
        print(f"Pushed to {url}", file=sys.stderr)
    return dst


class PushError(Exception):
    """DST was written but the upload failed (exit code 1)."""


def prepare_original(source, args: argparse.Namespace):
    """Config and file writer for an original LLaVA-NeXT SRC; every check (weights, tokenizer, settings) runs here."""
    import shutil

    from configuration_stgridpool import GEOMETRY_FIELDS

    from . import original
    from .repo import build_config

    info = original.read_weight_info(source.path, source.weight_files)
    original.check_weight_names(info, tied=bool(source.config.get("tie_word_embeddings", False)))
    tokenizer = original.load_tokenizer(source.path, args.tokenizer)
    converted, defaults = original.build_source_config(source.config, info, tokenizer, args.vision_config)
    config = build_config(converted, {**defaults, **chosen_settings(args)})
    processor = original.build_processor(config, tokenizer, {name: config[name] for name in GEOMETRY_FIELDS})

    def fill(temp):
        processor.save_pretrained(temp)
        if (source.path / "generation_config.json").is_file():
            shutil.copyfile(source.path / "generation_config.json", temp / "generation_config.json")
        original.stream_weights(source.path, info, temp)

    return config, fill


def main(argv=None) -> int:
    """Entry point; returns 0 on success, 2 on a refused conversion (nothing written), 1 when only the upload failed."""
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except PushError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    return 0
