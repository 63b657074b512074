"""Deployment out: the pickle-free bundle, the network rebuilt without fastai, prediction, evaluation and
ONNX export. Nothing here imports fastai (a test checks), except loading a trusted model.pkl on request."""
