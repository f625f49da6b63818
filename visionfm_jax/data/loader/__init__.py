"""The grain loaders: host-local batches for training (checkpointable, exact resume) and padded eval batches.
pipeline: classification and image-text pairs; dense: segmentation and detection; mixture: the training stream
over weighted sources; skipping: undecodable records left out deterministically; resume: a saved position on
another number of processes or workers; checks: the data section's checks between config fields."""
