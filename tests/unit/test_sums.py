"""Held-out sums: perplexity and the unigram baseline."""

import math

import numpy as np

from visionfm_jax.evaluate import sums


def test_unigram_perplexity_of_uniform_tokens_is_the_vocabulary_size():
  tokens = np.array([[2, 4, 5, 6, 7, 3], [2, 7, 6, 5, 4, 3]])  # BOS is never predicted; EOS is
  assert math.isclose(sums.unigram_perplexity([tokens]), 5.0)


def test_unigram_perplexity_ignores_padding_and_counts_across_batches():
  a = np.array([[2, 4, 4, 3, 0, 0]])
  b = np.array([[2, 5, 3, 0, 0, 0]])
  p = np.array([2, 1, 2]) / 5  # tokens 4, 5, 3
  assert math.isclose(sums.unigram_perplexity([a, b]), math.exp(-np.sum(p * np.log(p))))


def test_perplexity():
  assert math.isclose(sums.perplexity(2 * math.log(7.0), 2), 7.0)
  assert sums.perplexity(1.0, 0) == math.inf
