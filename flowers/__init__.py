"""flowers: one Keras 3 image classifier, trained and compared under torch, tensorflow and jax.

Importing this package imports neither keras nor any backend: the CLI chooses the backend first
(flowers.backend.select) and only then imports the modules that need keras.
"""

__version__ = "0.1.0"
