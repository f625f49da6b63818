"""Captions and tokens: the tokenizer (and the shapes demo tokenizer shipped in assets/), the retrieval
benchmarks with several captions per image read from their released layouts (caption_sets, named by
config.eval.retrieval_benchmarks), and the captioned data sets datatools.prepare_data turns into pairs
(pair_corpora). The top of data/: caption_sets builds its eval batches with loader/pipeline."""
