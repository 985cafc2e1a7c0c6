"""Training data (layer L2, beside ``eval/``): the datasets and their batch stream
(:mod:`dispersive.data.datasets`) and the VAE latent cache, written by ``dispersive
extract-latents`` and read back as a dataset (:mod:`dispersive.data.latents`).

Used by the training loop and by the commands that read data without training (``sample``,
``diagnose``, ``train-classifier``); nothing here imports the training system.
"""
