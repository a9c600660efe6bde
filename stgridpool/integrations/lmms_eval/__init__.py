"""lmms-eval integration for ST-GridPool (`pip install -e ".[eval]"`).

lmms-eval finds the `stgridpool` model through the `lmms_eval.models` entry-point group, which points at
`manifest` below; `stgridpool-compare` (this package's `compare`) runs a task list stock vs ST-GridPool and prints
the table; `tasks` is an `--include_path` folder of offline copies of the paper's tasks.
Importing this package does not import lmms-eval.
"""

MODEL_NAME = "stgridpool"
MODEL_CLASS_PATH = "stgridpool.integrations.lmms_eval.lmms_model.STGridPoolLMM"


def manifest():
    """Entry-point payload for lmms-eval's model registry: `--model stgridpool` -> `STGridPoolLMM`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)
