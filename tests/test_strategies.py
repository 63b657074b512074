"""Stage-wise parameter groups and the five schedules: frozen means frozen, each group at its LR."""
import json

import numpy as np
import pytest
import torch
from fastai.vision.all import Callback

from conftest import TINY, invoke
from fastft.recipe import Recipe
from fastft.train.model import create_learner, stage_splitter
from fastft.schedules import STRATEGIES
from fastft.train.strategies import fit

GROUPS = ["stem", "layer1", "layer2", "layer3", "layer4", "head"]


def train_with(name, learner, lr, epochs, freeze_epochs=1, unfreeze=2):
    """Fit strategy `name`'s phases on a watched learner (built for that strategy's head)."""
    learn, _, context = learner
    strategy = STRATEGIES[name]
    recipe = context.recipe.replace(epochs=epochs, freeze_epochs=freeze_epochs, unfreeze=unfreeze)
    fit(strategy, learn, strategy.plan(learn, lr, recipe), context)


class Watch(Callback):
    """Per epoch: a copy of the weights; per batch: each group's LR and whether it trains."""

    def before_fit(self):
        if not hasattr(self, "states"):
            self.states, self.lrs = [self.copy()], []

    def copy(self):
        return {k: v.detach().clone() for k, v in self.learn.model.state_dict().items()}

    def after_batch(self):
        if self.training:
            self.lrs.append([(h["lr"], any(p.requires_grad for p in ps))
                             for h, ps in zip(self.opt.hypers, self.opt.param_lists)])

    def after_epoch(self):
        self.states.append(self.copy())


def _group_of(name):
    if name.startswith("0.model."):
        part = name.split(".")[2]
        return "stem" if part in ("conv1", "bn1") else part
    return "head"


def batchnorm_names(model):
    return {f"{m}.{t}" for m, module in model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)
            for t, _ in [*module.named_parameters(), *module.named_buffers()]}


BN_NAMES = batchnorm_names(__import__("timm").create_model("resnet18", num_classes=0))


def changed(before, after, bn=False):
    """Groups whose weights moved: convolution/linear weights, or (bn=True) the body's BatchNorm tensors
    (weights, biases and running statistics)."""
    moved = set()
    for name, value in before.items():
        is_bn = name.startswith("0.model.") and name[len("0.model."):] in BN_NAMES
        if is_bn != bn or not value.is_floating_point():
            continue
        if not torch.equal(value, after[name]):
            moved.add(_group_of(name))
    return moved


def watched_learner(dataset, out, **recipe_changes):
    """(Learner, Watch, RunContext) of a prepared run, as `fastft train` sets it up, in one process on the CPU."""
    from fastft.train.setup import prepare

    recipe = Recipe(data=str(dataset), size=32, bs=4, workers=0, arch="resnet18", pretrained=False, aug="none",
                    device="cpu", precision="fp32", **recipe_changes)
    prepared = prepare(recipe, str(out))
    watch = Watch()
    prepared.learn.add_cb(watch)
    return prepared.learn, watch, prepared.context


@pytest.fixture
def learner(dataset, tmp_path):
    return watched_learner(dataset, tmp_path / "run")


def test_groups_follow_the_resnet_stages(learner):
    learn, _, _ = learner
    groups = stage_splitter(learn.model)
    assert len(groups) == 6
    names = {id(p): n for n, p in learn.model.named_parameters()}
    assert [sorted({_group_of(names[id(p)]) for p in g}) for g in groups] == [[g] for g in GROUPS]
    assert sum(map(len, groups)) == len(list(learn.model.parameters()))


def test_epochs_are_the_total_across_phases():
    for strategy in STRATEGIES:
        for epochs in (1, 2, 5, 9):
            plan = STRATEGIES[strategy].phases(1e-2, epochs, 6, {"freeze_epochs": 2, "unfreeze": 2})
            total = 1 if strategy == "probe" else epochs  # a probe is one epoch, whatever --epochs says
            assert sum(p.epochs for p in plan) == total and all(p.epochs > 0 for p in plan)
    assert [(p.trains, p.epochs) for p in STRATEGIES["gradual"].phases(1e-2, 5, 6, {})] == [(1, 1), (2, 1), (3, 1), (4, 1), (0, 1)]


def test_fine_tune_freezes_the_body_then_spreads_lrs_over_stages(learner):
    learn, watch, _ = learner
    train_with("fine-tune", learner, lr=1e-2, epochs=2, freeze_epochs=1, unfreeze=1)
    # epoch 1: only the head's weights move; BatchNorm trains everywhere (fastai's train_bn)
    assert changed(watch.states[0], watch.states[1]) == {"head"}
    assert changed(watch.states[0], watch.states[1], bn=True) >= {"stem", "layer4"}
    # epoch 2: every stage trains, each at its own peak LR, geometric from lr/200 (stem) to lr/2 (head)
    assert changed(watch.states[1], watch.states[2]) == set(GROUPS)
    per_batch = len(watch.lrs) // 2
    second = np.array([[lr for lr, _ in step] for step in watch.lrs[per_batch:]])
    for step in second:  # at every step of the one-cycle schedule, the same geometric spread
        np.testing.assert_allclose(step / step[-1], np.geomspace(1 / 100, 1, 6), rtol=1e-6)
    assert 1e-2 / 2 / 5 <= second[:, -1].max() <= 1e-2 / 2  # the head peaks at lr/2, starting from lr/2/div
    assert all(trains for step in watch.lrs[per_batch:] for _, trains in step)


def test_keras_freezes_batchnorm_too_and_unfreezes_only_the_top(learner):
    learn, watch, _ = learner
    train_with("keras", learner, lr=1e-3, epochs=2, freeze_epochs=1, unfreeze=1)
    assert changed(watch.states[0], watch.states[1]) == {"head"}
    assert changed(watch.states[0], watch.states[1], bn=True) <= {"head"}  # running stats included
    assert changed(watch.states[1], watch.states[2]) == {"layer4", "head"}
    assert changed(watch.states[0], watch.states[2], bn=True) <= {"layer4", "head"}
    assert {round(lr, 12) for lr, trains in watch.lrs[-1] if trains} == {1e-5}  # lr / 100, constant


def test_d2l_trains_everything_with_sgd_and_a_10x_head(learner):
    from fastai.optimizer import sgd_step

    learn, watch, _ = learner
    train_with("d2l", learner, lr=0.05, epochs=1)
    assert changed(watch.states[0], watch.states[1]) == set(GROUPS)
    assert sgd_step in learn.opt.cbs
    assert all(h["wd"] == 1e-3 for h in learn.opt.hypers)
    for step in watch.lrs:  # constant: no schedule
        assert [lr for lr, _ in step] == pytest.approx([0.005] * 5 + [0.05])


def test_gradual_unfreezes_one_stage_per_epoch_from_the_top(learner):
    learn, watch, _ = learner
    train_with("gradual", learner, lr=1e-2, epochs=3)
    assert changed(watch.states[0], watch.states[1]) == {"head"}
    assert changed(watch.states[1], watch.states[2]) == {"layer4", "head"}
    assert changed(watch.states[2], watch.states[3]) == set(GROUPS)


def test_scratch_trains_every_group_at_one_lr(learner):
    learn, watch, _ = learner
    train_with("scratch", learner, lr=1e-2, epochs=1)
    assert changed(watch.states[0], watch.states[1]) == set(GROUPS)
    assert all(len({lr for lr, _ in step}) == 1 for step in watch.lrs)


def test_probe_fits_a_linear_head_on_the_frozen_backbone_and_changes_nothing_else(dataset, tmp_path):
    learner = learn, watch, _ = watched_learner(dataset, tmp_path / "run", strategy="probe")
    assert isinstance(learn.model[1][-1], torch.nn.Linear) and learn.model[1][-1].bias is not None  # a linear head
    train_with("probe", learner, lr=0.0, epochs=5)
    assert len(watch.states) == 2  # one epoch, whatever --epochs says
    assert changed(watch.states[0], watch.states[1]) == {"head"}
    assert changed(watch.states[0], watch.states[1], bn=True) == set()  # BatchNorm statistics too: nothing trained
    assert watch.lrs == []  # no optimizer step at all
    from fastft.train.features import pooled_features

    features, mirrors, labels = pooled_features(learn, learn.dls.train_ds.items)
    assert features.shape == mirrors.shape and not torch.equal(features, mirrors)
    logits = learn.model[1][-1](features)
    assert (logits.argmax(1) == labels).float().mean() == 1.0  # two colours: the probe separates them


def test_the_probe_chooses_its_penalty_on_held_out_training_images_and_folds_the_scaling_in():
    from fastft.train.probe import LADDER, fit_linear_head

    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(20)
    features = torch.randn(60, 8, generator=generator) * 5 + 100  # far from standardised
    features[:, 0] += labels * 30  # one informative feature
    features = torch.cat([features, features + torch.randn(60, 8, generator=generator)])  # "mirror images"
    fitted = fit_linear_head(features, torch.cat([labels, labels]), 3, seed=0)
    assert fitted["penalty"] in LADDER and fitted["images"] == 60
    raw_logits = features @ fitted["weight"].T + fitted["bias"]
    assert (raw_logits.argmax(1) == torch.cat([labels, labels])).float().mean() == fitted["train_acc"] == 1.0


def test_the_probes_penalty_grid_goes_on_past_a_best_end_while_each_step_wins_beyond_noise(capsys):
    """A best penalty at the grid's end only says the optimum may lie beyond it: the grid goes on along LADDER while
    the next value does better beyond the noise of the held-out images, and the result says whether it ended at an
    edge."""
    from fastft.train.probe import LADDER, PENALTIES, choose_penalty, standardised

    def case(n: int, dims: int, signal: float) -> torch.Tensor:  # n images a class, `signal` on every dimension
        generator = torch.Generator().manual_seed(0)
        labels = torch.arange(2).repeat_interleave(n)
        features = torch.randn(2 * n, dims, generator=generator) + labels[:, None] * signal
        mirrors = features + 0.1 * torch.randn(2 * n, dims, generator=generator)
        return standardised(torch.cat([features, mirrors]))[0], torch.cat([labels, labels])

    cases = {"a clear signal spread thin": case(50, 1000, 0.2),  # less penalty is better, clearly, far below 0.001
             "a fainter one": case(50, 1000, 0.1),  # less looks better, within the noise of 20 held-out images
             "a signal the grid's middle suits": case(100, 2000, 0.1),
             "labels the features do not predict": case(300, 50, 0.0)}  # more looks better, within the noise
    chosen = {}
    for name, (x, labels) in cases.items():
        choice = chosen[name] = choose_penalty(x, labels, 2, seed=0, multi_label=False)
        tried = sorted(choice.losses)
        first = min(PENALTIES, key=choice.losses.get)  # the best of the grid itself
        assert set(PENALTIES) <= set(tried) <= set(LADDER)
        line = capsys.readouterr().out
        assert f"L2 penalty {choice.penalty:g}," in line
        if first not in (PENALTIES[0], PENALTIES[-1]):  # inside the grid: nothing more is tried
            assert tried == list(PENALTIES) and choice.penalty == first and not choice.at_edge
            assert "widened" not in line
            continue
        beyond = [p for p in tried if p not in PENALTIES]  # tried past the end that was best, on that side only
        assert beyond and all((p > PENALTIES[-1]) == (first == PENALTIES[-1]) for p in beyond), (name, tried)
        assert choice.at_edge and choice.penalty in (first, *beyond)
        assert f"the grid widened to {tried[0]:g}-{tried[-1]:g}" in line and "the end of the" in line
        assert choice.report() == {"penalty": choice.penalty, "at_edge": True,
                                   "tried": {f"{p:g}": round(choice.losses[p], 6) for p in tried}}
    assert chosen["a clear signal spread thin"].penalty < PENALTIES[0] / 10
    assert chosen["a fainter one"].penalty == PENALTIES[0] and chosen["a fainter one"].at_edge
    assert not chosen["a signal the grid's middle suits"].at_edge
    no_signal = chosen["labels the features do not predict"]
    assert no_signal.penalty == PENALTIES[-1] and no_signal.at_edge and max(no_signal.losses) > PENALTIES[-1]


def test_lp_ft_fine_tunes_every_stage_from_the_probe_with_batchnorm_statistics_kept(dataset, tmp_path):
    learner = learn, watch, _ = watched_learner(dataset, tmp_path / "run", strategy="lp-ft")
    train_with("lp-ft", learner, lr=1e-3, epochs=2)
    assert changed(watch.states[0], watch.states[1]) == {"head"}  # epoch 1: the probe
    assert changed(watch.states[1], watch.states[2]) == set(GROUPS)  # epoch 2: every stage
    running = {k for k in watch.states[0] if k.endswith(("running_mean", "running_var"))}
    assert running and all(torch.equal(watch.states[0][k], watch.states[2][k]) for k in running)
    rates = watch.lrs[-1]
    assert all(trains for _, trains in rates)
    np.testing.assert_allclose(np.array([lr for lr, _ in rates]) / rates[-1][0], np.geomspace(1 / 100, 1, 6), rtol=1e-6)


def test_compare_runs_every_strategy_side_by_side(dataset, tmp_path):
    out = tmp_path / "cmp"
    names = list(STRATEGIES)
    result = invoke("compare", "cifar", "--data", dataset, *TINY, "--epochs", "2", "--strategy", ",".join(names),
                    "--out", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "compare.json").read_text())
    assert [r["setting"] for r in rows] == names
    for row in rows:
        assert len(row["epochs"]) == (1 if row["setting"] == "probe" else 2) and {"loss", "train_acc", "test_acc", "examples_per_sec"} <= set(row)
        saved = (out / row["setting"] / "recipe.toml").read_text()
        assert f'strategy = "{row["setting"]}"' in saved and "seed = 42" in saved
    assert (out / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert "train acc" in result.stdout and "examples/sec" in result.stdout


def test_compare_checks_every_setting_before_training(dataset, tmp_path):
    result = invoke("compare", "cifar", "--data", dataset, *TINY, "--strategy", "fine-tune,warp", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "warp" in result.output and not (tmp_path / "c").exists()


def test_lr_finder_alone_and_inside_a_run(dataset, tmp_path):
    found = invoke("lr-find", "cifar", "--data", dataset, *TINY, "--out", tmp_path / "find")
    assert found.exit_code == 0, found.output
    assert "suggested lr" in found.stdout and (tmp_path / "find" / "lr_find.png").exists()
    assert "up to 100 steps" in found.stdout and "step 100/100" in found.stdout  # 4 batches a pass: it loops
    run = invoke("cifar", "--data", dataset, *TINY, "--epochs", "1", "--lr", "auto", "--out", tmp_path / "run")
    assert run.exit_code == 0, run.output
    from fastft.recipe import read_recipe_file

    lr = read_recipe_file(tmp_path / "run" / "recipe.toml").lr
    assert isinstance(lr, float) and lr > 0 and f"{lr:.2e}" in run.stdout


def test_fused_adam_takes_the_steps_of_fastais_adam(learner):
    """The default optimizer is torch's fused AdamW behind fastai's interface. Given the same gradients it
    takes fastai's Adam steps, as the Learner sets it up: a learning rate per stage group (a slice), beta1
    following the momentum schedule, decoupled weight decay on weights but not on BatchNorm and biases."""
    from fastai.optimizer import Adam

    from fastft.train.optimizer import FusedAdam

    fused, _, _ = learner
    reference, _ = create_learner(fused.dls, Recipe(size=32, bs=4, arch="resnet18", pretrained=False), opt_func=Adam)
    reference.model.load_state_dict(fused.model.state_dict())
    for learn in (fused, reference):
        learn.create_opt()
    assert isinstance(fused.opt, FusedAdam) and len(fused.opt.param_lists) == len(reference.opt.param_lists) == 6
    generator = torch.Generator().manual_seed(0)
    for step in range(6):
        gradients = [torch.randn(p.shape, generator=generator) for p in reference.model.parameters()]
        for learn in (fused, reference):
            learn.opt.set_hypers(lr=slice(1e-3 * (step + 1), 1e-2 * (step + 1)), mom=0.95 - 0.02 * step, wd=0.5)
            for p, g in zip(learn.model.parameters(), gradients):
                p.grad = g.clone()
            learn.opt.step()
    assert [h["lr"] for h in fused.opt.hypers] == pytest.approx([h["lr"] for h in reference.opt.hypers])
    for (name, ours), theirs in zip(fused.model.named_parameters(), reference.model.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)


def test_the_curves_and_the_comparison_tick_whole_epochs_only(tmp_path):
    from fastft.train.compare import plot_comparison
    from fastft.train.report import plot_curves

    epochs = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5, "test_loss": 1 / e, "test_acc": 0.6} for e in (1, 2, 3)]
    figures = [plot_curves(epochs, tmp_path / "curves.png"),
               plot_comparison([{"setting": s, "epochs": epochs} for s in ("a", "b")], tmp_path / "compare.png")]
    for figure in figures:
        for ax in figure.axes:
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_a_one_epoch_run_draws_no_single_dot_curve_and_says_so(dataset, tmp_path):
    """curves.png for a one-epoch probe was a single dot on an axis from 0.945 to 1.05."""
    from conftest import TINY, invoke

    result = invoke("train", dataset, *TINY, "--strategy", "probe", "--out", tmp_path / "probe")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "probe" / "curves.png").exists() and (tmp_path / "probe" / "history.csv").is_file()
    assert "no curves.png for a run of one epoch" in result.output
    two = invoke("train", dataset, *TINY, "--strategy", "fine-tune", "--epochs", "2", "--out", tmp_path / "two")
    assert two.exit_code == 0 and (tmp_path / "two" / "curves.png").is_file() and "no curves.png" not in two.output
