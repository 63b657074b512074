"""fastft: the textbook transfer-learning recipes for images, done properly, as one command each."""

from fastft.version import __version__


def load(path, trust_pickle: bool = False):
    """Load a trained model for inference: a run folder, model.json, model.onnx, or (trusted) model.pkl.

        m = fastft.load("runs/hotdog-20261123-101500")
        label, probabilities = m.predict("photo.jpg")
        for result in m.predict_batch(["a.jpg", "b.jpg"]): ...
    """
    from fastft.deploy.bundle import load as load_model

    return load_model(path, trust_pickle=trust_pickle)
