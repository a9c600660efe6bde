"""Print the offline task folder, for `--include_path "$(python -m stgridpool_eval.tasks)"`."""

from stgridpool_eval.tasks import TASKS_DIR

print(TASKS_DIR)
