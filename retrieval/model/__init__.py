"""The model side: the network (``network``), preprocessing to its input
(``preprocess``), datasets and augmentation for training (``dataset``,
``augment``), training itself (``train``), batched saliency-weighted embedding
(``embedding``) and the torch device choice (``device``).
"""
