"""The token ids every tokenizer of this project reserves, and where a row of tokens ends: shared by the tokenizers
(data/text/tokenizer.py) and the text models (models/text.py, models/generate.py) without either importing the other.
A leaf: no imports."""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)  # the ids every tokenizer here reserves, in id order


def eos_positions(tokens, eos_id: int = EOS_ID):
  """Index of the first `eos_id` in each row of `tokens` (..., L), and L - 1 (the last position) for a row
  without one (a row cut before its EOS pools its last token); numpy or jax arrays alike, jit-compatible."""
  is_eos = tokens == eos_id
  first = is_eos.argmax(-1)
  return first + (tokens.shape[-1] - 1 - first) * ~is_eos.any(-1)
