"""Plugins for other tools: `lmms_eval` (an lmms-eval model, found through its entry point) and `vllm` (a vLLM
model and video loader, found through vLLM's plugin entry point). Importing this package imports neither tool."""
