"""The readers of stored data, one module per layout: records (ArrayRecord, what datatools.prepare_data writes), wds
(img2dataset tars read in place), coco, ade20k, imagenet_variants, tfds_prepared. Each holds its
`config.data.source` kind, a `kind.SourceKind` record; embedded_sets holds the embedded sets' kinds (the sets
themselves are embedded/'s). `registry` is the table of kinds by name (`KINDS`) and what asks them (`build_source`,
`source_kind`, `class_names`, ...). assets/ holds the class lists the readers ship with."""
