"""Segmentation for free: saliency maps of the trained models, binarised and scored against masks.

Hypothesis (issue #5): a network that has learned to tell classes apart must separate the object
from the background, so its gradients segment the object with no extra training.

    geometry     masks between an image and the model's input view of it (align, restore, PNG)
    explainers   what to explain for each model (``Explainer``), and the explainer files
    experiment   the val-chosen binarisation and IoU scoring on a split table (``evaluate``)
    summary      the tables and the metrics JSON of a result

Saliency methods and the binarisation grammar are registries in ``retrieval.cam``; the
``retrieval segment`` command (a folder of images -> a folder of masks) is in ``retrieval.cli``.
"""
