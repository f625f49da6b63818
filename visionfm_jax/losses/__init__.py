"""The training objectives, one module per kind of target: image-text pairs (`image_text`: CLIP, SigLIP,
captioning), pixels (`pixels`: SimMIM, segmentation) and boxes (`detection`: focal and set losses over a
matching), each a function of arrays that the tasks call; and the geometry those set losses are taken over: box
ops (`boxes`) and the Hungarian matching (`matching`)."""
