"""Figures: pure functions, data in, matplotlib Figure out (the caller saves it).

One module per topic: ``training`` (normalisation, curves), ``evaluation`` (confusion matrix,
ROC, distances, retrieval examples, embeddings), ``segmentation`` (Grad-CAM overlays, IoU).
"""

import matplotlib

matplotlib.use("Agg")
