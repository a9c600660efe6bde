"""Command line: `python -m stgridpool.convert SRC DST [options]` (console script `stgridpool-convert`).

Every refusal is one line on stderr naming the input, the value and what is allowed, exit code 2, and DST is left
as it was (not even created): all checks run before anything is written.
"""

import argparse
import signal
import sys
from pathlib import Path

from stgridpool.options import parse_setting

from .errors import ConversionError

PROG = "stgridpool-convert"
# The ST-GridPool options: flag -> VideoPoolingSettings field, and the help. The one table between the two names.
SETTING_OPTIONS = {
    "--video-pooling-mode": (
        "video_pooling_mode",
        "stgridpool (default), bilinear (stock LLaVA-OneVision) or average (stock LLaVA-Video)",
    ),
    "--pyramid-levels": ("pyramid_levels", "PTG levels GROUP:STRIDE,... (default 4:2,4:4,4:8); 'none' disables PTG"),
    "--keep-ratio": ("nsp_keep_ratio", "NSP keep ratio 1/k^2 (default 0.25)"),
    "--temperature": ("nsp_temperature", "NSP softmax temperature > 0 (default 1.0)"),
    "--norm-p": ("nsp_norm_p", "p of the token-norm score (default 2)"),
    "--padding": ("nsp_padding", "NSP zero padding per side, integer >= 0 (default 0)"),
    "--partial-windows": (
        "nsp_partial_windows",
        "also pool border windows that do not fill k x k (27 -> 14 tokens a side; default: off, 27 -> 13)",
    ),
    "--newline-position": ("video_newline_position", "one_token (default), grid, frame or none"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setting_type(flag: str, field: str):
    """argparse `type` for one setting: the shared parser (stgridpool.options), errors naming the flag."""

    def parse(text: str):
        try:
            return parse_setting(field, text, label=flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = field  # argparse names the type in some messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Convert a LLaVA-OneVision checkpoint (Transformers format, safetensors) into an ST-GridPool model "
        "repo that loads with trust_remote_code=True. Weights are hard-linked or copied, never loaded.",
    )
    parser.add_argument(
        "src", metavar="SRC", help="local checkpoint directory or Hub model id (model_type llava_onevision)"
    )
    parser.add_argument(
        "dst", metavar="DST", help="directory to write the repo to (must be new or empty unless --overwrite)"
    )
    group = parser.add_argument_group("ST-GridPool settings (default: the paper's)")
    for flag, (field, help_text) in SETTING_OPTIONS.items():
        if field == "nsp_partial_windows":
            group.add_argument(flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=field, type=setting_type(flag, field), help=help_text)
    parser.add_argument("--base-model", help="Hub id for the card's base_model (default: SRC when it is a Hub id)")
    parser.add_argument("--src-revision", help="revision of SRC when it is a Hub model id")
    parser.add_argument("--copy", action="store_true", help="copy the weights instead of hard-linking them")
    parser.add_argument(
        "--tokenizer", help="original LLaVA-NeXT SRC only: tokenizer directory or Hub id, if SRC ships none"
    )
    parser.add_argument(
        "--vision-config",
        help="original LLaVA-NeXT SRC only: JSON file with the SigLIP vision config, for a tower not known by name",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it is a non-empty directory")
    hub = parser.add_argument_group("Hub upload")
    hub.add_argument(
        "--push-to-hub", metavar="REPO_ID", help="upload the repo to this Hub model repo (created if needed)"
    )
    hub.add_argument("--private", action="store_true", help="create the Hub repo private")
    hub.add_argument("--revision", help="branch to upload to (created if needed; default main)")
    return parser


def chosen_settings(args: argparse.Namespace) -> dict:
    """The ST-GridPool fields given on the command line (the others keep the source's values or the defaults)."""
    fields = (field for field, _ in SETTING_OPTIONS.values())
    return {field: getattr(args, field) for field in fields if getattr(args, field) is not None}


def check_hub_options(args: argparse.Namespace) -> None:
    """--private and --revision need --push-to-hub; the repo id must be a valid one."""
    if args.push_to_hub is None:
        for flag, value in (("--private", args.private), ("--revision", args.revision)):
            if value:
                raise ConversionError(
                    f"{flag}={value!r} is invalid without --push-to-hub; allowed only together with "
                    "--push-to-hub REPO_ID"
                )
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
    from configuration_stgridpool import VideoPoolingSettings

    from .card import model_card
    from .hub import push_to_hub
    from .repo import build_config, check_destination, check_processor_files, copy_stock_files, write_repo
    from .source import inspect_source

    # Cheapest checks first: building the config imports Transformers (seconds).
    check_hub_options(args)
    source = inspect_source(args.src, args.src_revision)
    dst = Path(args.dst).absolute()  # a symbolic link stays one: write_repo writes into its target
    check_destination(dst, source.path, args.overwrite)
    if source.layout == "original":
        config, fill = prepare_original(source, args)
    else:
        for flag, value in (("--tokenizer", args.tokenizer), ("--vision-config", args.vision_config)):
            if value:
                raise ConversionError(
                    f"{flag}={value!r} is invalid for a Transformers-format SRC; allowed only for original "
                    "LLaVA-NeXT checkpoints"
                )
        check_processor_files(source)
        config = build_config(source.config, chosen_settings(args))

        def fill(temp):
            copy_stock_files(source, temp, args.copy)

    settings = VideoPoolingSettings.from_config(config).to_kwargs()
    card = model_card(
        source.card_metadata, args.base_model or source.hub_id, settings, args.push_to_hub, source.path.name
    )
    write_repo(source.path, config, card, dst, fill, overwrite=args.overwrite)
    print(f"Wrote {dst}", file=sys.stderr)
    if args.push_to_hub:
        try:
            url = push_to_hub(dst, args.push_to_hub, private=args.private, revision=args.revision)
        except Exception as error:  # network, auth, permissions: the repo on disk is complete; say so in one line
            reason = str(error).splitlines()[0] if str(error) else ""
            raise PushError(
                f"wrote {dst} but uploading it to {args.push_to_hub!r} failed ({type(error).__name__}: {reason})"
            ) from None
        print(f"Pushed to {url}", file=sys.stderr)
    return dst


class PushError(Exception):
    """DST was written but the upload failed (exit code 1)."""


def prepare_original(source, args: argparse.Namespace):
    """Config and file writer for an original LLaVA-NeXT SRC; every check (weights, tokenizer, settings) runs here."""
    import shutil

    from configuration_stgridpool import VideoPoolingSettings

    from . import original
    from .repo import build_config

    info = original.read_weight_info(source.path, source.weight_files)
    original.check_weight_names(info, tied=bool(source.config.get("tie_word_embeddings", False)))
    tokenizer = original.load_tokenizer(source.path, args.tokenizer)
    try:
        converted, defaults = original.build_source_config(source.config, info, tokenizer, args.vision_config)
    except ConversionError:
        raise
    except Exception as error:  # a field of the wrong type in SRC's config.json
        reason = str(error).splitlines()[0] if str(error) else ""
        raise ConversionError(
            f"SRC config.json is invalid: {type(error).__name__}: {reason}; allowed is an original LLaVA-NeXT config"
        ) from None
    config = build_config(converted, {**defaults, **chosen_settings(args)})
    processor = original.build_processor(config, tokenizer, VideoPoolingSettings.from_config(config))

    def fill(temp):
        processor.save_pretrained(temp)
        if (source.path / "generation_config.json").is_file():
            shutil.copyfile(source.path / "generation_config.json", temp / "generation_config.json")
        original.stream_weights(source.path, info, temp)

    return config, fill


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so the temporary folder is removed


def main(argv=None) -> int:
    """Entry point; returns 0 on success, 2 on a refused conversion (nothing written), 1 when only the upload
    failed, 130 when interrupted (Ctrl-C or SIGTERM; DST left as it was)."""
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        run(args)
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except PushError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; DST={args.dst!r} is as it was before", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
