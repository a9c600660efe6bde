"""Offline copies of the paper's lmms-eval tasks: an lmms-eval `--include_path` folder (this package's directory).

Each `<task>_local` task is lmms-eval 0.7.3's own `<task>` (its prompts, answer parsing, metrics and aggregation,
read from the installed lmms-eval at load time) with the documents and videos read from a local copy under
`$STGRIDPOOL_EVAL_DATA` instead of the Hub; see `local.py` for the layout.
`python -m stgridpool.integrations.lmms_eval.tasks` prints this folder.
Importing this package does not import lmms-eval.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
