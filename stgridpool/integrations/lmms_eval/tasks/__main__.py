"""Print the offline task folder, for `--include_path "$(python -m stgridpool.integrations.lmms_eval.tasks)"`."""

from stgridpool.integrations.lmms_eval.tasks import TASKS_DIR

print(TASKS_DIR)
