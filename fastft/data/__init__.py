"""Data in: dataset folders and downloads, image decoding, the decode-once cache, augmentation and the
fastai DataLoaders. Modules here import fastai only inside the functions that build transforms or loaders,
so inference (fastft.deploy) can use folders and images without it."""
