"""Trained models from a path, for the tools, the benchmarks and `visionfm_jax.load`: a training workdir
(`workdir`), a tools.import_hf directory or a transformers CLIPModel directory, each built as the task that
trained it (`loader`, with `clip_config` for the CLIP directories), and the notebook API over them (`model`)."""
