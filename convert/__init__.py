"""Convert a LLaVA-OneVision checkpoint (Transformers format) into an ST-GridPool model repo for the Hub.

`python -m convert SRC DST [options]` or `stgridpool-convert SRC DST [options]`; see `convert.cli`.
"""


def main(argv=None) -> int:
    """Run the converter's command line with `argv` (default: sys.argv[1:]); returns the exit code."""
    from .cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
