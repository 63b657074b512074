"""timm architectures, local weight files, and the errors for the wrong ones."""
import pytest
import timm
import torch
from safetensors.torch import save_file

from conftest import TINY, fastft
from fastft.errors import UsageError
from fastft.recipe import Recipe
from fastft.train.model import check_arch, create_learner, normalization


def test_arch_names_with_and_without_tags():
    for arch in ("resnet18", "resnet18.tv_in1k", "tf_efficientnet_lite0"):
        check_arch(arch)
    with pytest.raises(UsageError, match="unknown architecture 'resnet19'.*resnet18"):
        check_arch("resnet19")
    with pytest.raises(UsageError, match="no weights tag 'nope'.*tv_in1k"):
        check_arch("resnet18.nope")


def test_normalisation_follows_the_model_config():
    assert normalization("tf_efficientnet_lite0") == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization("resnet18.tv_in1k") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@pytest.fixture(scope="module")
def tiny_dls(dataset):
    from fastft.data.loaders import build_dataloaders, load_split

    recipe = Recipe(size=32, bs=4, workers=0)
    return build_dataloaders(load_split(dataset, recipe), recipe, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(tiny_dls, tmp_path, suffix):
    source = timm.create_model("test_resnet", pretrained=False)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    learn, loaded = create_learner(tiny_dls, Recipe(arch="test_resnet", pretrained=True, weights=str(path)))
    assert loaded == str(path)
    loaded = learn.model[0].model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    # the head is new: two classes, not timm's 1000
    assert learn.model[-1][-1].out_features == 2


def test_weights_of_another_arch_are_a_clean_error(tiny_dls, tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), path)
    with pytest.raises(UsageError, match=r"other.safetensors fits \d+ of the \d+ backbone tensors of resnet18.*--arch"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(path)))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"definitely not a state dict")
    with pytest.raises(UsageError, match="junk.pth is not a readable state dict"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(junk)))
    with pytest.raises(UsageError, match="does not exist"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(tmp_path / "missing.pth")))
    with pytest.raises(UsageError, match="--no-pretrained"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(path), pretrained=False))


def test_weights_that_fit_only_part_of_the_backbone_are_an_error_with_the_count(tiny_dls, tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("layer4.")}
    kept = sum(1 for k in partial if not k.endswith("num_batches_tracked"))
    total = sum(1 for k in state if not k.endswith("num_batches_tracked"))
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(UsageError, match=rf"partial.safetensors fits {kept} of the {total} backbone tensors of resnet18"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(tmp_path / "partial.safetensors")))


def test_weights_of_a_bigger_relative_are_refused_not_loaded_in_part(tiny_dls, tmp_path):
    """resnet34's file holds every resnet18 tensor with the same shape (as lite1's holds lite0's): it trained, and
    its other tensors were ignored without a word. Only the classifier, which fastft replaces, may be left over."""
    state = timm.create_model("resnet34").state_dict()
    extra = sum(1 for k in state if k not in timm.create_model("resnet18").state_dict())
    save_file(state, tmp_path / "resnet34.safetensors")
    with pytest.raises(UsageError, match=rf"resnet34.safetensors holds {extra} tensors that resnet18 does not have "
                                         r"\(e.g. layer1.2.\S+\): it is another architecture's"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(tmp_path / "resnet34.safetensors")))


def test_a_fastft_run_as_weights_loads_its_backbone_and_its_head_when_the_classes_match(trained_run, tiny_dls, tmp_path):
    import shutil

    from safetensors.torch import load_file

    run = trained_run[0]  # the cifar recipe's head: no dropout
    saved = load_file(str(run / "model.safetensors"))
    for weights in (run, run / "model.safetensors", run / "model.json"):
        learn, described = create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(weights), head_dropout=0.0))
        loaded = learn.model.state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        assert "backbone and head" in described
    other_head, described = create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(run), head_dropout=0.5))
    body = other_head.model[0].state_dict()
    assert all(torch.equal(body[k], saved[f"0.{k}"]) for k in body) and "new head" in described
    with pytest.raises(UsageError, match="pass --arch resnet18"):
        create_learner(tiny_dls, Recipe(arch="resnet34", weights=str(run)))
    alone = tmp_path / "copied.safetensors"  # a bundle's weights without the model.json that says what they are
    shutil.copy(run / "model.safetensors", alone)
    with pytest.raises(UsageError, match=r"copied.safetensors fits 0 of the \d+ backbone tensors of resnet18"):
        create_learner(tiny_dls, Recipe(arch="resnet18", weights=str(alone)))


def test_pretrained_weights_offline_name_both_ways_out(dataset, tmp_path):
    args = [a for a in TINY if a != "--no-pretrained"]
    result = fastft("hotdog", "--data", dataset, *args, "--epochs", "1", "--out", tmp_path / "r",
                    env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.stderr
    assert "--weights" in result.stderr and "--no-pretrained" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "r").exists()
    assert len(result.stderr.strip().splitlines()) == 1 and "(" in result.stderr and "...)" not in result.stderr


def test_scratch_never_loads_weights(dataset, tmp_path):
    from conftest import invoke

    path = tmp_path / "other.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), path)  # would not fit resnet18
    args = [a for a in TINY if a != "--no-pretrained"]
    result = invoke("cifar", "--data", dataset, *args, "--epochs", "1", "--strategy", "scratch", "--weights", path,
                    "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "not loading" in result.stderr
    saved = (tmp_path / "run" / "recipe.toml").read_text()
    assert "pretrained = false" in saved and 'weights = ""' in saved


@pytest.mark.parametrize("dropout", [0.5, 0.2, 0.0])
def test_fastai_free_network_matches_the_learner_for_any_head_dropout(tiny_dls, dropout):
    from fastft.deploy.network import build_network

    learn, _ = create_learner(tiny_dls, Recipe(arch="resnet18", pretrained=False, head_dropout=dropout))
    rebuilt = build_network("resnet18", 2, {"dropout": dropout})
    rebuilt.load_state_dict(learn.model.state_dict(), strict=True)
    dropouts = [m.p for m in learn.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [m.p for m in rebuilt.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == ([dropout / 2, dropout] if dropout else [])
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(learn.model.eval()(x), rebuilt.eval()(x))


def test_weight_decay_reaches_the_optimizer(tiny_dls):
    learn, _ = create_learner(tiny_dls, Recipe(arch="resnet18", pretrained=False, wd=0.3))
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    assert {h["wd"] for h in learn.opt.hypers} == {0.3}


def test_label_smoothing_spreads_the_target_over_the_classes(tiny_dls):
    plain, _ = create_learner(tiny_dls, Recipe(arch="resnet18", pretrained=False))
    smooth, _ = create_learner(tiny_dls, Recipe(arch="resnet18", pretrained=False, label_smoothing=0.2))
    logits, target = torch.tensor([[4.0, -4.0]]), torch.tensor([0])
    log_p = logits.log_softmax(dim=1)
    assert plain.loss_func(logits, target).item() == pytest.approx(-log_p[0, 0].item())
    # eps spread evenly over the classes: (1 - eps) on the target plus eps * mean over all classes
    want = -(0.8 * log_p[0, 0] + 0.2 * log_p[0].mean()).item()
    assert smooth.loss_func(logits, target).item() == pytest.approx(want, rel=1e-5)
