"""Image retrieval with contrastive (metric) learning.

One concept per module: ``data`` (indexing, loading, splits), ``synthetic`` (the bundled sample
dataset), ``transforms``, ``cache`` (decoded-image cache), ``models``, ``losses``, ``sampling``
(pairs, triplets, miners), ``training``, ``embed`` (batched inference), ``search`` (FAISS),
``metrics``, ``cam`` (saliency and segmentation), ``plots``, ``report`` and ``tracking``
(the only module that talks to MLflow).
"""

__version__ = "0.1.0"
