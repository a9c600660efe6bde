"""`python -m stgridpool` = the `stgridpool` console script."""

from stgridpool.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
