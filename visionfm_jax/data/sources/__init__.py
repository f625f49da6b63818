"""The readers of stored data, one module per layout, and `registry`, which names them by
`config.data.source` (`build_source`, `source_kind`, `class_names`, ...): records (ArrayRecord, what
datatools.prepare_data writes), wds (img2dataset tars read in place), coco, ade20k, imagenet_variants. assets/ holds
the class lists the readers ship with. The embedded sets are embedded/'s."""
