"""Convert a LLaVA-OneVision checkpoint (Transformers format, or an original LLaVA-NeXT one) into an ST-GridPool model
repo for the Hub: `stgridpool-convert SRC DST [options]` or `python -m stgridpool.convert ...`; see `cli`.

Installed as `stgridpool.convert` (the folder keeps its top-level place in the source tree).
"""
