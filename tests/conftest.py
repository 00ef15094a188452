"""Shared test fixtures. Tests build tiny models and small local data; nothing here reaches the network.

* ``one_thread`` — tiny models run fastest on one thread (and 2-core CI machines are shared). Modules that
  want it say ``pytestmark = pytest.mark.usefixtures("one_thread")``.
* ``tiny_corpus`` — the tiny learnable token-shard corpus of helpers.make_corpus (module-scoped, built once per module).
* ``registered_variant`` — registers a test-only attention variant for one test and removes it afterwards.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    from helpers import make_corpus  # tests/ is on sys.path

    return make_corpus(tmp_path_factory.mktemp("corpus") / "shards")


@pytest.fixture
def registered_variant():
    """``registered_variant(spec)`` registers ``spec`` (a diffattn.variants.VariantSpec) until the test ends."""
    from diffattn import variants

    added = []

    def register(spec):
        variants.register(spec)
        added.append(spec.name)
        return spec

    yield register
    for name in added:
        variants.unregister(name)
