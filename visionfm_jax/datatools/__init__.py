"""The data-preparation CLIs, beside tools/'s model CLIs: prepare_data (image sets into ArrayRecord shards),
index_tars (img2dataset tars for the `wds:` source), filter_clip_score, train_tokenizer, build_tfds (ImageNet for
TFDS); cluster_task gives each task of a cluster job its share of the inputs."""
