"""Detection's geometry: box ops (`boxes`) and the Hungarian matching (`matching`) that its set losses
(losses/detection.py) are taken over."""
