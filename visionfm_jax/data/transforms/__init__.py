"""What turns a record into an example. host: decoding, crops, resizes and the record -> example ops on the host
(numpy and Pillow); randaugment; dense_transforms: the dense tasks' geometry (masks, boxes); device_augment: the
per-pixel half of the training augmentation, under jit on the device."""
