"""Data: the default offline corpus, user corpora, tokenizers and token shards (issue #3).

Submodules (imported on demand, nothing heavy is loaded here):
``sources`` (pinned registry sources, ``fetch_source``), ``archive`` (safe extraction),
``text`` (decoding and cleaning), ``corpus`` (documents from sources and user paths),
``tokenizer`` (BPE / GPT-2 / HF tokenizers), ``shards`` (``write_shards``, ``read_index``,
``load_tokenizer``), ``prepare`` (``diffattn data prepare``) and ``loader`` (windows for training).
See docs/data.md.
"""
