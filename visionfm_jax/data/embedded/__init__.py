"""The embedded procedural sets: no download, deterministic per (seed, split, index). shapes: one coloured shape
per image with a class, a colour, a caption and a box; scenes: several shapes per image, with masks and boxes."""
