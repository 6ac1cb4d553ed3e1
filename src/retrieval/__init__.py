"""Image retrieval with contrastive (metric) learning.

One concept per module; a variant (backbone, loss, saliency method, compared model, report
section) is one registry entry in one of them.

    config       typed, validated params.yaml (the dataclass defaults equal params.yaml)
    workspace    where the project, the datasets and the shared caches are
    paths        every file the stages hand each other (dvc.yaml's deps and outs)
    outputs      atomic writes, one-line user errors, JSON/CSV/Markdown outputs
    sources      SOURCES (registry): where data.source puts the images (synthetic, digits, folder)
    data         indexing a folder, loading images and masks, splits
    synthetic    the bundled sample dataset (shapes x patterns, with exact masks)
    digits       scikit-learn's bundled 8x8 handwritten digits as a folder dataset (offline)
    transforms   pixels -> model inputs; NORMALIZATIONS (one per backbone family); batched
                 augmentation with its own generator
    cache        the decoded-image cache and cached arrays (frozen features)
    models       the embedding network; BACKBONES (registry); checkpoints
    runtime      device, bf16 autocast, channels_last, torchrun/DDP
    embed        batched inference over the image cache
    rng          every named random stream
    sampling     pairs, triplets, class-balanced batches, unlabelled view batches, mining
    losses       LOSSES (registry): contrastive, triplet, in-batch, SupCon, cross entropy,
                 NT-Xent (label-free)
    training     the training loop (fit), encoders
    metrics      verification and retrieval metrics, bootstrap CIs
    search       FAISS k-NN: exact, approximate (index_factory) with tuned nprobe/efSearch
    gallery      an indexed gallery: FAISS index + manifest + card, built from any folder
    compared     COMPARED_MODELS (registry): baseline / frozen / fine-tuned
    evaluation   pair verification and retrieval of the compared models, their tables
    retrieval_view  the self-contained HTML page of test queries and their top-k
    embed_viz    t-SNE / PCA layouts, silhouettes, kNN accuracy, radial spokes or clusters
    cam          SALIENCY_METHODS (registry), binarisation, IoU and the trivial baselines
    segmentation geometry, explainers, the val-chosen experiment, its summary
    plots        figures: pure functions, data in, matplotlib Figure out
    report       inputs, observations, SECTIONS (registry), one renderer per format
    tracking     the only module that talks to MLflow
    publish      the trained networks as MLflow models; the registry version
    export       TorchScript and ONNX exports, checked against PyTorch
    webapp       the search page (FastAPI; templates/)
    cli          the `retrieval` command (compare, search, index, segment, serve)
"""

__version__ = "0.1.0"
