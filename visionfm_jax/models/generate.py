"""Caption generation for Aurora with the decoder's key/value caches: greedy decoding and beam search.

Both start from the caption memory (B, Q, W) of `Aurora.caption_memory` on normalised images. Step 0 feeds BOS
with the memory (the cross-attention keys and values are projected once and cached); every later step feeds
the one token chosen at the previous step with memory=None. Rows are (B, max_len) int32: BOS, the generated
tokens, EOS, then PAD. A row that reaches max_len without EOS is cut there.

Beam search keeps K hypotheses per example in one flat batch of B*K rows (example b's beams are rows
b*K .. b*K + K-1). Each step scores the K*V one-token extensions of an example's beams, keeps the K best and
gathers every cache leaf (layers leading: (layers, B*K, ...)) by the chosen parent beam. A finished beam (it
emitted EOS) can only be extended by PAD at log-prob 0, so it keeps its score and competes with the live ones.
Scores are summed token log-probs (EOS included) divided by GNMT's length penalty ((5 + n) / 6) ** alpha, n
the number of generated tokens; alpha = 0 ranks by the raw sum. Live and finished beams are ranked by the same
normalised score. With K = 1 beam search is greedy decoding.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from visionfm_jax.token_ids import BOS_ID, EOS_ID, PAD_ID

Params = Any


def _check_len(model, max_len: int) -> None:
  if not 1 <= int(max_len) <= model.text.max_len:
    raise ValueError(f"max_len={max_len}: expected 1..{model.text.max_len} (the text encoder's max_len)")


def _pieces(model, pieces: int | None) -> int:
  """The ids a caption may hold: the tokenizer's `pieces` (a decoder sized for a larger vocabulary than its
  tokenizer has rows no caption can decode), or every row of the decoder."""
  vocab = model.decoder.vocab_size
  if pieces is None:
    return vocab
  if not 1 <= int(pieces) <= vocab:
    raise ValueError(f"pieces={pieces}: expected 1..{vocab} (the decoder's vocab_size)")
  return int(pieces)


def _decode(model, params, tokens, cache, index, memory, pieces: int):
  """One decode_step on (rows, 1) tokens at position `index` -> ((rows, vocab) fp32 log-probs over the first
  `pieces` ids, -inf beyond, new cache)."""
  logits, cache = model.apply({"params": params}, tokens, cache, index, memory, method="decode_step")
  logits = logits[:, -1].astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < pieces, logits, -jnp.inf)
  return jax.nn.log_softmax(logits, axis=-1), cache


def greedy(
  model,
  params: Params,
  memory: jax.Array,
  *,
  max_len: int,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  pad_id: int = PAD_ID,
  pieces: int | None = None,
) -> jax.Array:
  """(B, Q, W) caption memory -> (B, max_len) int32 tokens: BOS, the argmax token of each step (of the first
  `pieces` ids), EOS, PAD."""
  _check_len(model, max_len)
  return _greedy(model, params, memory, int(max_len), int(bos_id), int(eos_id), int(pad_id), _pieces(model, pieces))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6, 7))
def _greedy(model, params, memory, max_len: int, bos_id: int, eos_id: int, pad_id: int, pieces: int):
  batch = memory.shape[0]
  tokens = jnp.full((batch, max_len), pad_id, jnp.int32).at[:, 0].set(bos_id)
  if max_len == 1:
    return tokens

  def step(t, tokens, done, cache, memory):
    token_logp, cache = _decode(
      model, params, jax.lax.dynamic_slice_in_dim(tokens, t, 1, axis=1), cache, t, memory, pieces
    )
    token = jnp.where(done, pad_id, jnp.argmax(token_logp, axis=-1).astype(jnp.int32))
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], t + 1, axis=1)
    return tokens, done | (token == eos_id), cache

  tokens, done, cache = step(0, tokens, jnp.zeros((batch,), bool), model.init_cache(batch, max_len), memory)

  def cond(carry):
    t, _, done, _ = carry
    return (t < max_len - 1) & ~jnp.all(done)

  def body(carry):
    t, tokens, done, cache = carry
    return (t + 1, *step(t, tokens, done, cache, None))

  _, tokens, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), tokens, done, cache))
  return tokens


def length_penalty_factor(lengths: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + n) / 6) ** alpha for n generated tokens (1 when alpha = 0)."""
  return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def beam_search(
  model,
  params: Params,
  memory: jax.Array,
  *,
  beam_size: int,
  max_len: int,
  length_penalty: float = 0.0,
  bos_id: int = BOS_ID,
  eos_id: int = EOS_ID,
  pad_id: int = PAD_ID,
  pieces: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(B, Q, W) caption memory -> (best tokens (B, max_len) int32, their scores (B,) fp32); see module doc."""
  _check_len(model, max_len)
  if int(beam_size) < 1:
    raise ValueError(f"beam_size={beam_size}: must be at least 1")
  if float(length_penalty) < 0:
    raise ValueError(f"length_penalty={length_penalty}: must be >= 0")
  return _beam_search(
    model,
    params,
    memory,
    jnp.float32(length_penalty),
    int(beam_size),
    int(max_len),
    int(bos_id),
    int(eos_id),
    int(pad_id),
    _pieces(model, pieces),
  )


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8, 9))
def _beam_search(
  model, params, memory, alpha: jax.Array, k: int, max_len: int, bos_id: int, eos_id: int, pad_id: int, pieces: int
):
  batch, vocab = memory.shape[0], model.decoder.vocab_size
  tokens = jnp.full((batch, k, max_len), pad_id, jnp.int32).at[:, :, 0].set(bos_id)
  # Only beam 0 is live at first: the K beams would otherwise pick the same K tokens.
  logp = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, k)).astype(jnp.float32)
  lengths = jnp.zeros((batch, k), jnp.int32)
  finished = jnp.zeros((batch, k), bool)
  if max_len == 1:
    return tokens[:, 0], logp[:, 0]
  pad_only = jnp.where(jnp.arange(vocab) == pad_id, 0.0, -jnp.inf).astype(jnp.float32)
  rows = jnp.arange(batch)[:, None] * k

  def step(t, state, cache, memory):
    tokens, logp, lengths, finished = state
    token_logp, cache = _decode(
      model,
      params,
      jax.lax.dynamic_index_in_dim(tokens, t, axis=2, keepdims=False).reshape(batch * k, 1),
      cache,
      t,
      memory,
      pieces,
    )
    token_logp = jnp.where(finished[..., None], pad_only, token_logp.reshape(batch, k, vocab))
    cand_logp = (logp[..., None] + token_logp).reshape(batch, k * vocab)
    cand_len = jnp.broadcast_to((lengths + ~finished)[..., None], (batch, k, vocab)).reshape(batch, k * vocab)
    score = cand_logp / length_penalty_factor(cand_len, alpha)  # exactly cand_logp when alpha = 0
    _, index = jax.lax.top_k(score, k)
    parent, token = index // vocab, (index % vocab).astype(jnp.int32)
    parent_finished = jnp.take_along_axis(finished, parent, axis=1)
    tokens = jnp.take_along_axis(tokens, parent[..., None], axis=1)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[..., None], t + 1, axis=2)
    state = (
      tokens,
      jnp.take_along_axis(cand_logp, index, axis=1),
      jnp.take_along_axis(cand_len, index, axis=1),
      parent_finished | (token == eos_id),
    )
    flat_parent = (rows + parent).reshape(-1)
    return state, jax.tree.map(lambda a: jnp.take(a, flat_parent, axis=1), cache)

  state, cache = step(
    0, (tokens, logp, lengths, finished), model.init_cache(batch * k, max_len), jnp.repeat(memory, k, axis=0)
  )

  def cond(carry):
    t, state, _ = carry
    return (t < max_len - 1) & ~jnp.all(state[3])

  def body(carry):
    t, state, cache = carry
    return (t + 1, *step(t, state, cache, None))

  _, (tokens, logp, lengths, _), _ = jax.lax.while_loop(cond, body, (jnp.int32(1), state, cache))
  scores = logp / length_penalty_factor(lengths, alpha)
  best = jnp.argmax(scores, axis=1)
  return (
    jnp.take_along_axis(tokens, best[:, None, None], axis=1)[:, 0],
    jnp.take_along_axis(scores, best[:, None], axis=1)[:, 0],
  )


@functools.partial(jax.jit, static_argnums=0)
def caption_memory(model, params: Params, images: jax.Array) -> jax.Array:
  """(B, H, W, 3) normalised images -> (B, Q, W) caption memory (jitted `Aurora.caption_memory`)."""
  return model.apply({"params": params}, images, method="caption_memory")


def tokens_to_text(tokenizer, tokens) -> list[str]:
  """(B, L) or (L,) token rows -> one string per row (up to the first EOS; BOS and PAD dropped)."""
  tokens = np.asarray(tokens)
  return list(tokenizer.decode(tokens.reshape(-1, tokens.shape[-1])))


def caption_images(
  task,
  params: Params,
  images: np.ndarray | Sequence[np.ndarray],
  *,
  beam_size: int = 1,
  max_len: int | None = None,
  length_penalty: float = 0.0,
) -> list[str]:
  """uint8 (B, H, W, 3) images at the model's size -> one caption each (greedy when beam_size is 1)."""
  model = task.model
  images = jax.device_put(np.stack(images) if not isinstance(images, np.ndarray) else images)
  memory = caption_memory(model, params, task.normalize(images))
  max_len = max_len or model.text.max_len
  pieces = task.tokenizer.vocab_size
  if beam_size == 1:
    tokens = greedy(model, params, memory, max_len=max_len, pieces=pieces)
  else:
    tokens, _ = beam_search(
      model, params, memory, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, pieces=pieces
    )
  return tokens_to_text(task.tokenizer, jax.device_get(tokens))
