"""Training: the timm model and its weights, fine-tuning strategies, optimizer, devices and number
formats, many processes, one run and side-by-side comparisons. Everything here may import fastai."""
