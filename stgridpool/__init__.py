"""stgridpool-llava: ST-GridPool for LLaVA-OneVision / LLaVA-Video in Transformers.

The algorithm lives in the top-level Hub modules (`CODE_MODULES`), which a converted model repo ships as remote code;
this package holds what runs around them: the `stgridpool` command (`cli`), the model loader with its trust rule
(`loading`), encoding a video while it decodes (`streaming`), the converter (`convert`) and the lmms-eval and vLLM
plugins (`integrations`).
"""

from pathlib import Path

# The Hub modules: the converter copies them byte for byte into a repo, and the loader trusts a repo's code files only
# when they equal these.
CODE_MODULES = (
    "configuration_stgridpool", "modeling_stgridpool_llava", "processing_stgridpool", "stgridpool_triton",
    "video_stgridpool",
)  # fmt: skip


def code_file(module: str) -> Path:
    """The installed file of one of the Hub modules (`CODE_MODULES`)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"the Hub module {module!r} is not installed; reinstall stgridpool-llava")
    return Path(spec.origin)
