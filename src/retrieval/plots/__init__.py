"""Figures: pure functions, data in, matplotlib Figure out (the caller saves it).

One module per topic: ``training`` (normalisation, curves), ``evaluation`` (confusion matrix,
ROC, distances, retrieval examples, embeddings), ``segmentation`` (Grad-CAM overlays, IoU).
No module here picks a matplotlib backend: the programs do (``outputs.run_main``: Agg).
"""
