"""fastft: the textbook transfer-learning recipes for images, done properly, as one command each."""

__version__ = "0.1.0"
