"""`python -m stgridpool.convert SRC DST [options]`, also the `stgridpool-convert` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
