"""Weight conversion into our models.

`from_hf(path, scan=..., dtype=...)`: a Hugging Face ViT directory (`save_pretrained`) -> `(vit.ViT, variables)`.
`stack_layers` / `unstack_layers`: unrolled `blocks_<i>` <-> scanned `blocks` param layouts.
"""

from visionfm_jax.convert.hf_vit import from_hf
from visionfm_jax.convert.layout import stack_layers, unstack_layers

__all__ = ["from_hf", "stack_layers", "unstack_layers"]
