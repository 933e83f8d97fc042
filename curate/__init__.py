"""curate: from a folder of images to a training-ready dataset, and training on it."""
__version__ = "0.1.0"
