"""Image data sets into the ArrayRecord shards of `data.sources.records`:
`python -m visionfm_jax.datatools.prepare_data` (see `__main__`, its flags and usage). One module per input format:
`folders` (class trees, listed by `image_tree`) with `unlabelled` (trees of images without labels), `webdataset`
(img2dataset tars), `captioned` (COCO and Visual Genome) and `own_pairs` (a folder of images with caption files, a
table of path + caption); what they share: `shards` (shard jobs, their writing and sidecars, resuming, worker
processes and cluster tasks, the output checks and dataset.json's entries) and `images` (reading, verifying and
shrinking an image)."""
