"""Training with TVM (learn/train.py): the compiled gradients of a region equal finite
differences of its compiled loss, fitting recovers known weights, the region's inputs are
what the function computes there, the batched forward equals the batch-1 model, and the
fine-tune's block reconstruction and distillation run end to end on real models."""

import numpy as np
import pytest
from tvm import relax

from tvm_rebirth import flow
from tvm_rebirth.compile.build import Runner
from tvm_rebirth.errors import RebirthError
from tvm_rebirth.learn.finetune import RECONSTRUCT_EPOCHS, finetune
from tvm_rebirth.learn.train import (BatchedForward, RegionTrainer, TrainResult, compute_vars,
                                     reaches)
from tvm_rebirth.passes import rebirth_pipeline
from tvm_rebirth.passes.dataflow import Dataflow

from onnx_models import GraphMaker, chain_model

RNG = np.random.default_rng(0)


def _lrn_net(path):
    """data -> conv1 -> relu -> LRN -> max-pool -> conv2 -> BN -> relu -> conv3: the ops
    (and gradients) a block between two sites passes through."""
    g = GraphMaker((1, 3, 12, 12))
    x = g.relu(g.conv("data", "conv1", 6), "relu1")
    x = g.maxpool(g.lrn(x, "norm1"), "pool1", k=2, s=2)
    x = g.relu(g.bn(g.conv(x, "conv2", 8), "bn2"), "relu2")
    return g.save(path, [g.conv(x, "conv3", 4, k=1)])


def _two_site_net(path):
    """data -> conv1 -> relu -> LRN -> max-pool -> conv2 -> relu -> max-pool -> conv3: two
    learned sites, the second reading what the first computes."""
    g = GraphMaker((1, 3, 12, 12))
    x = g.relu(g.conv("data", "conv1", 6), "relu1")
    x = g.maxpool(g.lrn(x, "norm1"), "pool1", k=2, s=2)
    x = g.maxpool(g.relu(g.conv(x, "conv2", 8), "relu2"), "pool2", k=2, s=2)
    return g.save(path, [g.conv(x, "conv3", 4, k=1)])


def _plain(mod):
    return relax.transform.ToNonDataflow()(mod)["main"]


def _named(func, name):
    return next(b.var for blk in func.body.blocks for b in blk.bindings
                if str(b.var.name) == name)


def test_region_gradients_match_finite_differences(tmp_path):
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    func = _plain(model.mod)
    out = func.body.body
    trainer = RegionTrainer(func, [out], {"conv1": ("w1", "b1"), "conv2": ("w2", "b2")},
                            batch=2)
    assert trainer.keys == ["w1", "b1", "w2", "b2"]
    assert [str(v.name) for v in trainer.inputs] == ["data"]
    x = RNG.standard_normal((2, 3, 12, 12)).astype(np.float32)
    target = RNG.standard_normal((2, 4, 6, 6)).astype(np.float32)
    arrays = {k: v.astype(np.float32) for k, v in trainer.initial.items()}
    scales = np.ones(1, np.float32)
    _, grads = trainer.gradients([x], [target], arrays, scales)
    eps = 1e-2
    for key in ("b1", "w2"):
        flat = arrays[key].reshape(-1)
        for index in RNG.choice(flat.size, 4, replace=False):
            shifted = []
            for sign in (1, -1):
                changed = dict(arrays)
                changed[key] = arrays[key].copy()
                changed[key].reshape(-1)[index] += sign * eps
                shifted.append(trainer.loss([x], [target], changed, scales))
            numeric = (shifted[0] - shifted[1]) / (2 * eps)
            assert abs(grads[key].reshape(-1)[index] - numeric) <= \
                2e-2 * abs(numeric) + 1e-3, (key, index)


def test_each_target_loss_is_its_term_of_the_loss(tmp_path):
    """Two targets (conv1's output and the model's): each target's loss is its mean squared
    error x its scale, computed here in numpy from the model's own activations, and they sum
    to the loss; ``diverging`` names the targets whose fitted loss is far below their
    held-out loss."""
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    func = _plain(model.mod)
    conv1, out = _named(func, "conv1"), func.body.body
    trainer = RegionTrainer(func, [conv1, out], {"conv1": ("w1", "b1"), "conv2": ("w2", "b2")},
                            batch=4, from_params=True)
    images = RNG.standard_normal((8, 3, 12, 12)).astype(np.float32)
    targets = [RNG.standard_normal((8, *[int(d) for d in v.ty.shape][1:])).astype(np.float32)
               for v in (conv1, out)]
    scales = np.array([0.5, 2.0], np.float32)
    arrays = {k: v.astype(np.float32) for k, v in trainer.initial.items()}
    got = trainer.target_losses([images], targets, arrays, scales)
    activations = compute_vars(func, [conv1, out], images, "test", batch=4)
    want = [float(np.mean((a - t) ** 2)) * s for a, t, s in zip(activations, targets, scales)]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert abs(sum(got) - trainer.loss([images], targets, arrays, scales)) <= 1e-4 * sum(got)
    result = TrainResult(arrays={}, held_out_before=1.0, held_out_after=1.0, fit_before=1.0,
                         fit_after=0.9, epochs=1, kept_epoch=1, seconds=0.0,
                         fit_target_losses=[0.8, 0.01], held_out_target_losses=[0.9, 0.03])
    assert result.diverging(0.5) == [1] and result.diverging(0.3) == []


def test_fit_recovers_the_weights_that_made_the_targets(tmp_path):
    """Targets from the model's own conv2; fitting from perturbed weights brings the loss
    down by far, and the held-out images pick the epoch kept."""
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    func = _plain(model.mod)
    end = Dataflow(func).users_of(_named(func, "conv2"))[0]  # its bias add
    trainer = RegionTrainer(func, [end], {"conv2": ("w2", "b2")}, batch=8)
    images = RNG.standard_normal((64, 3, 12, 12)).astype(np.float32)
    inputs = trainer.capture(images)
    assert len(inputs) == 1 and inputs[0].shape[1:] == (6, 6, 6)
    forward = BatchedForward(_prefix(func, end), 8)
    targets = np.concatenate([forward(images[i:i + 8]) for i in range(0, 64, 8)])
    start = {"w2": trainer.initial["w2"] + 0.3 * RNG.standard_normal(
        trainer.initial["w2"].shape).astype(np.float32), "b2": trainer.initial["b2"]}
    held = np.arange(64) % 8 == 7
    result = trainer.fit(inputs, [targets], held, start, epochs=100, lr=1e-2)
    assert result.held_out_after < 0.05 * result.held_out_before
    assert 1 <= result.kept_epoch <= 100
    assert result.fit_after < 0.05 * result.fit_before
    # one target: its held-out term is the held-out loss that chose the epoch, which is the
    # compiled loss on the held-out images (scaled by the fitted targets' mean square)
    assert len(result.fit_target_losses) == len(result.held_out_target_losses) == 1
    assert result.held_out_target_losses[0] == pytest.approx(result.held_out_after, rel=1e-5)
    scales = np.array([1.0 / np.mean(targets[~held].astype(np.float64) ** 2)], np.float32)
    assert result.held_out_after == pytest.approx(
        trainer.loss([inputs[0][held]], [targets[held]], result.arrays, scales), rel=1e-5)


def _prefix(func, out):
    """``func`` up to ``out``, as a function returning it."""
    body = relax.BlockBuilder().normalize(relax.SeqExpr(func.body.blocks, out))
    return relax.analysis.remove_all_unused(relax.Function(func.params, body))


def test_batched_forward_equals_the_model(tmp_path):
    model = flow.load(chain_model(tmp_path / "net.onnx", ["relu", "lrn", "max_pool2d"]))
    images = RNG.standard_normal((3, 4, 32, 32)).astype(np.float32)
    want = np.concatenate([Runner(model.mod)(images[i:i + 1])[0] for i in range(3)])
    got = BatchedForward(_plain(model.mod), 3)(images)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # fewer images than the compiled batch (the last batch of a held-out set)
    forward = BatchedForward(_plain(model.mod), 2)
    got = np.concatenate([forward(images[:2]), forward(images[2:])])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    # several outputs: an inner var and the output, each as the model computes it
    func = _plain(model.mod)
    conv, out = BatchedForward(func, 3, outputs=[_named(func, "conv1"),
                                                 func.body.body]).run(images)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert conv.shape == (3, *[int(d) for d in list(_named(func, "conv1").ty.shape)[1:]])


def test_image_augmentation_relabels_what_it_blends():
    """Mixup: a ``mix`` share of the batch becomes blends of two of its images, and the
    targets are the teacher's on the images as changed (not the inputs' targets)."""
    from tvm_rebirth.learn.train import image_augmentation

    def teacher(x):  # two targets, neither linear in the image
        return [np.tanh(x).sum(axis=(1, 2, 3)), x.max(axis=(2, 3))]

    images = RNG.standard_normal((64, 2, 5, 5)).astype(np.float32)
    augment = image_augmentation(teacher, flip=False, shift=0, mix=0.5)
    (x,), targets = augment([images], teacher(images), np.random.default_rng(1))
    blended = np.array([not any(np.array_equal(a, b) for b in images) for a in x])
    assert 16 <= blended.sum() <= 48 and x.shape == images.shape
    np.testing.assert_array_equal(x[~blended], images[~blended])
    for got, want in zip(targets, teacher(x)):
        np.testing.assert_array_equal(got, want)
    (x,), _ = image_augmentation(teacher, flip=False, shift=0, mix=0.0)(
        [images], teacher(images), np.random.default_rng(1))
    np.testing.assert_array_equal(x, images)  # no blends, no flips, no shifts: unchanged


def test_captures_in_batches_equal_the_model_one_image_at_a_time(tmp_path):
    """compute_vars runs several images a call (the last batch padded): each image's vars
    are the model's on that image alone, whatever the batch; the batch follows the input
    size."""
    from tvm_rebirth.learn.train import capture_batch

    model = flow.load(chain_model(tmp_path / "net.onnx", ["relu", "lrn", "max_pool2d"]))
    func = _plain(model.mod)
    variables = [_named(func, "conv1"), func.body.body]
    images = RNG.standard_normal((5, 4, 32, 32)).astype(np.float32)
    runner = Runner(model.mod)
    want = np.concatenate([runner(images[i:i + 1])[0] for i in range(5)])
    first = None
    for batch in (1, 2, None):  # None: capture_batch, 32 for 4x32x32 inputs
        conv, out = compute_vars(func, variables, images, "test", batch=batch)
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        first = conv if first is None else first
        np.testing.assert_allclose(conv, first, rtol=1e-4, atol=1e-4 * np.abs(first).max())
    assert capture_batch((1, 4, 32, 32)) == 32 and capture_batch((1, 3, 224, 224)) == 3
    assert capture_batch((1, 3, 2048, 2048)) == 1


def test_region_must_reach_its_outputs(tmp_path):
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    func = _plain(model.mod)
    early = _named(func, "conv1")
    assert not reaches(func, {"conv2": ("w", "b")}, [early])
    with pytest.raises(RebirthError, match="not computed from its trainable convs"):
        RegionTrainer(func, [early], {"conv2": ("w", "b")}, batch=2)


@pytest.mark.heavy
def test_block_reconstruction_beats_the_closed_form_alone(monkeypatch, caplog):
    """fmnist-inception, every site, 168 images: the slimmed model's outputs on images it
    never saw are closer to the original's with block reconstruction than without. (The
    divergence warning's threshold is raised so that every block reports it.)"""
    monkeypatch.setattr("tvm_rebirth.learn.finetune.DIVERGED", 1e9)
    model = flow.load("fmnist-inception")
    plan = flow.find_plan(model)
    images, _ = flow.calibration(model, flow.RebirthOptions(images=192), plan)
    fit, unseen = images[:168], images[168:]
    original = Runner(model.mod)
    want = np.concatenate([original(x[None])[0] for x in unseen])
    errors = {}
    for epochs in (0, RECONSTRUCT_EPOCHS):
        weights, report = finetune(model, plan, fit, reconstruct_epochs=epochs, mirror=False,
                                   distill_epochs=0)
        blocks = [r["block"] for r in report["sites"] if "block" in r]
        assert len(blocks) == (len(plan.sites) if epochs else 0)
        if epochs:
            assert blocks[-1]["ends_at"] == "output"
            assert all(b["held_out_after"] <= b["held_out_before"] for b in blocks)
        slimmed = Runner(rebirth_pipeline(plan, weights.arrays)(model.mod))
        got = np.concatenate([slimmed(x[None])[0] for x in unseen])
        errors[epochs] = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert errors[RECONSTRUCT_EPOCHS] < 0.9 * errors[0], errors
    assert "more calibration images would help" in caplog.text


def test_finetune_refuses_an_untrainable_model_before_fitting(tmp_path, monkeypatch):
    """An op without a gradient (here a conv_transpose in the tail) stops the fine-tune
    with its name before anything is fitted; --reconstruct-epochs 0 still works."""
    g = GraphMaker((1, 3, 16, 16))
    x = g.maxpool(g.relu(g.conv("data", "conv1", 8), "relu1"), "pool1", k=2, s=2)
    x = g.conv(x, "conv2", 8)
    w = g._const("up_w", RNG.standard_normal((8, 4, 2, 2)))
    g.nodes.append(__import__("onnx").helper.make_node(
        "ConvTranspose", [x, w], ["up"], name="up", kernel_shape=[2, 2], strides=[2, 2]))
    g.channels["up"] = 4
    model = flow.load(g.save(tmp_path / "net.onnx", ["up"]))
    plan = flow.find_plan(model)
    assert any(not s.exact for s in plan.sites)
    images = RNG.standard_normal((160, 3, 16, 16)).astype(np.float32)  # enough for blocks
    fitted = []
    monkeypatch.setattr("tvm_rebirth.learn.finetune.capture",
                        lambda *a, **k: fitted.append(1) or (_ for _ in ()).throw(
                            AssertionError("fitted")))
    with pytest.raises(RebirthError, match="conv2d_transpose"):
        finetune(model, plan, images)
    assert not fitted
    monkeypatch.undo()
    weights, report = finetune(model, plan, images, reconstruct_epochs=0)
    assert weights.arrays and not any("block" in r for r in report["sites"])


def test_a_block_too_big_for_the_budget_keeps_its_closed_form(tmp_path, monkeypatch):
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    plan = flow.find_plan(model)
    images = RNG.standard_normal((160, 3, 12, 12)).astype(np.float32)
    monkeypatch.setattr("tvm_rebirth.learn.finetune.RECONSTRUCT_MACS", 1e6)
    small_budget, report = finetune(model, plan, images, distill_epochs=0)
    blocks = [r["block"] for r in report["sites"] if not r["exact"]]
    assert blocks and all("steps" in b["skipped"] for b in blocks)
    closed_form, _ = finetune(model, plan, images, reconstruct_epochs=0)
    for key, value in closed_form.arrays.items():
        np.testing.assert_array_equal(small_budget.arrays[key], value)


def test_the_default_fine_tune_ends_with_a_distillation_it_can_afford(tmp_path, monkeypatch):
    """After block reconstruction the whole slimmed network is distilled on the calibration
    images and their mirror images, to the original's output and each later site's input;
    the slimmed model's output on the held-out images gets closer to the original's. A model
    that cannot afford DISTILL_MIN_EPOCHS is not distilled, and says so."""
    from tvm_rebirth.learn.finetune import (DISTILL_EPOCHS, DISTILL_MIX, DISTILL_RETRY_LR,
                                            DistillSettings, _held_out)

    model = flow.load(_two_site_net(tmp_path / "net.onnx"))
    plan = flow.find_plan(model)
    assert [s.exact for s in plan.sites] == [False, False]
    images = RNG.standard_normal((512, 3, 12, 12)).astype(np.float32)  # 64 held out
    held = images[_held_out(images)]
    original = Runner(model.mod)
    want = np.concatenate([original(x[None])[0] for x in held])

    def held_out_error(weights):
        slimmed = Runner(rebirth_pipeline(plan, weights.arrays)(model.mod))
        got = np.concatenate([slimmed(x[None])[0] for x in held])
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    # with blends of two images, relabelled by the original (the default), the held-out
    # images still choose the epoch: never worse than the start. (The divergence threshold
    # raised: every target counts as overfitting and is named with its losses; their
    # held-out terms sum to the held-out loss.)
    monkeypatch.setattr("tvm_rebirth.learn.finetune.DIVERGED", 1e9)
    _, report = finetune(model, plan, images, reconstruct_epochs=1)
    distilled = report["distillation"]
    assert distilled["mixed"] == DISTILL_MIX > 0
    assert distilled["held_out_loss_after"] <= distilled["held_out_loss_before"]
    diverging = distilled["diverging"]
    assert list(diverging)[-1] == "output" and len(diverging) == 1 + distilled["site_inputs"]
    assert sum(held for _, held in diverging.values()) == \
        pytest.approx(distilled["held_out_loss_after"], rel=1e-4)
    monkeypatch.undo()
    # blends of noise images are another distribution (smaller variance): the gain below
    # is measured on the images alone
    unblended = DistillSettings(mix=0.0)
    # one epoch per block leaves the distillation something to gain
    weights, report = finetune(model, plan, images, reconstruct_epochs=1,
                               distill_settings=unblended)
    distilled = report["distillation"]
    assert distilled["epochs"] == DISTILL_EPOCHS and distilled["held_out_images"] == 128
    assert distilled["site_inputs"] == 1, distilled  # the first site reads the image
    assert distilled["kept_epoch"] >= 1, distilled  # some epoch did better than the start
    assert distilled["held_out_loss_after"] < distilled["held_out_loss_before"]
    undistilled, report = finetune(model, plan, images, reconstruct_epochs=1, distill_epochs=0)
    assert "distillation" not in report
    assert held_out_error(weights) < held_out_error(undistilled)
    # a peak rate that keeps no epoch: distilled again at DISTILL_RETRY_LR, which does better
    _, report = finetune(model, plan, images, reconstruct_epochs=1,
                         distill_settings=DistillSettings(mix=0.0, lr=1e3))
    retried = report["distillation"]
    assert retried["lr"] == DISTILL_RETRY_LR and retried["kept_epoch"] >= 1, retried
    _, report = finetune(model, plan, images[:500], reconstruct_epochs=1)  # 62 held out
    assert report["distillation"] == {"skipped": "62 held-out images"}
    _, report = finetune(model, plan, images, reconstruct_epochs=1,
                         distill_settings=DistillSettings(macs=1e6))
    assert "affordable epochs" in report["distillation"]["skipped"]


def test_the_distillation_runs_on_its_own_as_its_settings_say(tmp_path):
    """``distill`` from the weights of a fine-tune without distillation is the fine-tune's
    last step (the same seed, the same weights); its settings choose the targets (the
    output alone) and whether images are held out (none: every image fitted)."""
    from tvm_rebirth.learn.finetune import DistillSettings, distill

    model = flow.load(_two_site_net(tmp_path / "net.onnx"))
    plan = flow.find_plan(model)
    images = RNG.standard_normal((512, 3, 12, 12)).astype(np.float32)
    unblended = DistillSettings(mix=0.0)
    distilled, _ = finetune(model, plan, images, reconstruct_epochs=1, distill_epochs=4,
                            distill_settings=unblended)
    start, report = finetune(model, plan, images, reconstruct_epochs=1, distill_epochs=0)
    assert "distillation" not in report
    arrays = dict(start.arrays)
    alone = distill(model, plan, arrays, images, 4, unblended)
    assert alone["site_inputs"] == 1 and alone["held_out_images"] == 128, alone
    assert sorted(arrays) == sorted(distilled.arrays)
    for key, value in distilled.arrays.items():
        np.testing.assert_allclose(arrays[key], value, rtol=1e-5, atol=1e-6, err_msg=key)

    arrays = dict(start.arrays)
    output_only = distill(model, plan, arrays, images, 4,
                          DistillSettings(mix=0.0, site_inputs=False, hold_out=False))
    assert output_only["site_inputs"] == 0 and "output and 0 site" in output_only["loss"]
    assert output_only["held_out_images"] == 0 and output_only["images"] == 1024
    assert output_only["epoch_chosen_on"] == "fitted images" != alone["epoch_chosen_on"]
    assert any(not np.array_equal(arrays[k], start.arrays[k]) for k in arrays)
    # a batch larger than the images there are: skipped and said why, the weights kept
    arrays = dict(start.arrays)
    for settings in (DistillSettings(batch=1024), DistillSettings(batch=4096, hold_out=False)):
        assert distill(model, plan, arrays, images, 4, settings) == \
            {"skipped": f"fewer images than a batch of {settings.batch}"}
    assert all(np.array_equal(arrays[k], start.arrays[k]) for k in arrays)


def test_staged_arguments_are_the_values_of_each_call():
    """The tensors made once hold each call's values: strided and 0-d values, a new shape or
    dtype (a new buffer), a shorter argument list after a longer one."""
    from tvm_rebirth.learn.train import StagedArguments

    staged = StagedArguments()
    weights = RNG.standard_normal((8, 6, 3, 3)).astype(np.float32)
    first = [RNG.standard_normal((4, 3, 5, 5)).astype(np.float32), weights[:, ::2],
             np.float32(0.5), np.arange(4)]
    tensors = staged(first)
    for tensor, value in zip(tensors, first, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), value)
        assert tensor.numpy().dtype == np.asarray(value).dtype
    second = [first[0] * 2, weights[:, 1::2], np.float32(-1.0), np.arange(5.0)]
    again = staged(second)
    assert again[0] is tensors[0] and again[3] is not tensors[3]  # same shape: same tensor
    for tensor, value in zip(again, second, strict=True):
        np.testing.assert_array_equal(tensor.numpy(), value)
    assert len(staged(second[:2])) == 2


@pytest.mark.parametrize("settings, fragment", [
    (dict(batch=0), "DistillSettings.batch must be an integer of at least 1, got 0"),
    (dict(batch=2.5), "DistillSettings.batch"), (dict(min_epochs=0), "min_epochs"),
    (dict(min_held_out=-1), "min_held_out"), (dict(lr=float("nan")), "DistillSettings.lr"),
    (dict(lr=0.0), "DistillSettings.lr"), (dict(retry_lr=-1e-3), "retry_lr"),
    (dict(mix=1.5), "DistillSettings.mix"), (dict(mix=float("nan")), "DistillSettings.mix"),
    (dict(macs=float("inf")), "DistillSettings.macs"), (dict(macs=0.0), "macs"),
])
def test_distill_settings_that_cannot_train_are_refused_when_made(settings, fragment):
    from tvm_rebirth.learn.finetune import DistillSettings

    with pytest.raises(RebirthError, match=fragment.replace(".", r"\.")):
        DistillSettings(**settings)


def test_fine_tune_arguments_are_checked_before_any_fitting(tmp_path, monkeypatch):
    """Values the CLI would refuse, given to the Python API: one RebirthError naming the
    argument, before anything is captured or fitted."""
    from tvm_rebirth.learn.finetune import distill

    model = flow.load(_two_site_net(tmp_path / "net.onnx"))
    plan = flow.find_plan(model)
    images = RNG.standard_normal((64, 3, 12, 12)).astype(np.float32)

    def held_out(images):  # the first step of both, once the arguments are checked
        raise AssertionError("the images were split for fitting before the check")

    monkeypatch.setattr("tvm_rebirth.learn.finetune._held_out", held_out)
    for kwargs, fragment in (
            (dict(seed=-1), "seed must be an integer of at least 0, got -1"),
            (dict(reconstruct_epochs=-1), "reconstruct_epochs"),
            (dict(distill_epochs=1.5), "distill_epochs"),
            (dict(e2e_labels=np.zeros(64, np.int64)), "e2e_labels label the e2e_images"),
            (dict(e2e_images=images[:0]), "e2e_images is empty"),
            (dict(e2e_images=images[:, :1]), "end-to-end images must be an N x 3 x 12 x 12"),
            (dict(e2e_images=images, e2e_epochs=0), "e2e_epochs must be an integer of at "
                                                    "least 1")):
        with pytest.raises(RebirthError, match=fragment):
            finetune(model, plan, images, **kwargs)
    for epochs, seed, fragment in ((0, 0, "epochs must be"), (4, -2, "seed must be")):
        with pytest.raises(RebirthError, match=fragment):
            distill(model, plan, {}, images, epochs, seed=seed)
    with pytest.raises(AssertionError, match="split for fitting"):  # valid: it goes on
        finetune(model, plan, images)


def _cli_in_process(capsys, *args) -> tuple:
    """(stdout, stderr) of ``tvm-rebirth *args`` run in this process; it must succeed."""
    import logging

    from tvm_rebirth import cli

    logs = logging.getLogger("tvm_rebirth")
    handlers, level = list(logs.handlers), logs.level
    try:
        code = cli.main(list(args))
    finally:  # the CLI's stderr handler would outlive the captured stream
        logs.handlers[:] = handlers
        logs.setLevel(level)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


def test_the_cli_names_what_fits_its_images_far_better_than_the_held_out_ones(
        tmp_path, monkeypatch, capsys):
    """`tvm-rebirth finetune` (in process, the divergence threshold raised so that every
    target of every training counts as overfitting): after the table, one line says that
    more calibration images would help and names each block's, the distillation's and
    the end-to-end refinement's targets with their fitted and held-out losses; the
    warnings are on stderr."""
    net = _two_site_net(tmp_path / "net.onnx")
    np.save(tmp_path / "calib.npy", RNG.standard_normal((512, 3, 12, 12)).astype(np.float32))
    monkeypatch.setattr("tvm_rebirth.learn.finetune.DIVERGED", 1e9)
    sites = [s.id for s in flow.find_plan(flow.load(net)).sites]

    def finetune_cli(*args) -> tuple:
        """(the CLI's line on calibration images, its stderr)"""
        out, err = _cli_in_process(capsys, "finetune", str(net), "--select", "all", "--calib",
                                   str(tmp_path / "calib.npy"), "-o", str(tmp_path / "w.npz"),
                                   *args)
        return next(x for x in out.splitlines()
                    if x.startswith("more calibration images would help")), err

    line, err = finetune_cli("--reconstruct-epochs", "1", "--distill-epochs", "4")
    for where in [f"{site}: " for site in sites] + ["distillation: input of ", "output loss"]:
        assert where in line, line
    assert err.count("more calibration images would help") == 3
    line, err = finetune_cli("--reconstruct-epochs", "0", "--distill-epochs", "0", "--e2e",
                             "--e2e-images", "512", "--e2e-epochs", "2")
    assert "end-to-end refinement: output loss" in line, line
    assert not any(f"{site}: " in line for site in sites), line  # no block was trained
    assert err.count("more calibration images would help") == 1


def test_eval_says_which_stages_of_its_fine_tune_were_short_of_images(tmp_path, monkeypatch,
                                                                     capsys):
    """`tvm-rebirth eval` fine-tunes when given no weights: its JSON names the stages that
    fitted their images far better than the held-out ones, as `finetune` does, for the same
    line at the end of its text (fmnist-inception's streamline sites, every target counted
    as overfitting: each trained block is named); with no target counted, its text has no
    such line."""
    import json

    from tvm_rebirth import cli
    from tvm_rebirth.demo import diverging_line

    _cli_in_process(capsys, "plan", "fmnist-inception", "--select", "all", "--kinds",
                    "streamline", "-o", str(tmp_path / "p.yaml"))
    args = ("eval", "fmnist-inception", "--plan", str(tmp_path / "p.yaml"), "--limit", "20",
            "--images", "128", "--reconstruct-epochs", "1", "--distill-epochs", "0")
    monkeypatch.setattr("tvm_rebirth.learn.finetune.DIVERGED", 0.0)
    out, _ = _cli_in_process(capsys, *args)
    assert "more calibration images" not in out, out
    monkeypatch.setattr("tvm_rebirth.learn.finetune.DIVERGED", 1e9)
    out, _ = _cli_in_process(capsys, *args, "--json")
    data = json.loads(out)
    assert set(data["diverging"]) == set(data["sites"]), data  # every block trained
    for targets in data["diverging"].values():
        assert targets and all(fit > 0 and held > 0 for fit, held in targets.values()), targets
    line = cli._diverging_line(data["diverging"]).strip()  # what the text would end with
    assert line.startswith("more calibration images would help"), line
    assert all(f"{site}: " in line for site in data["diverging"]), line
    # the demo's line on its accuracy model, from the same report
    line = diverging_line({"model": data["model"], "diverging": data["diverging"]})
    assert line.startswith("fmnist-inception's fine-tune: more calibration images"), line
    assert all(f"{site}: " in line for site in data["diverging"]), line
    assert diverging_line({"model": data["model"], "diverging": {}}) == ""


def test_the_training_seed_makes_the_fine_tune_repeatable(tmp_path):
    """The same seed gives the same weights (block reconstruction and distillation alike);
    another seed another batch order and other blends, so other weights; the report says
    which seed."""
    model = flow.load(_two_site_net(tmp_path / "net.onnx"))
    plan = flow.find_plan(model)
    images = RNG.standard_normal((512, 3, 12, 12)).astype(np.float32)

    def tuned(seed):
        weights, report = finetune(model, plan, images, reconstruct_epochs=1,
                                   distill_epochs=4, mirror=False, seed=seed)
        assert report["seed"] == seed and report["distillation"]["epochs"] == 4, report
        return weights.arrays

    first, again, other = tuned(0), tuned(0), tuned(1)
    assert first.keys() == again.keys() == other.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], again[key])
    assert any(not np.array_equal(first[key], other[key]) for key in first)


def test_fit_stops_when_the_held_out_loss_stops_improving(tmp_path):
    """A learning rate that only makes things worse: patience 2 stops after two epochs and
    keeps the starting weights."""
    model = flow.load(_lrn_net(tmp_path / "net.onnx"))
    func = _plain(model.mod)
    end = Dataflow(func).users_of(_named(func, "conv2"))[0]
    trainer = RegionTrainer(func, [end], {"conv2": ("w2", "b2")}, batch=8)
    images = RNG.standard_normal((64, 3, 12, 12)).astype(np.float32)
    inputs = trainer.capture(images)
    targets = BatchedForward(_prefix(func, end), 64)(images)
    result = trainer.fit(inputs, [targets], np.arange(64) % 8 == 7, epochs=50, lr=10.0,
                         patience=2)
    assert result.epochs == 2 and result.kept_epoch == 0
    np.testing.assert_array_equal(result.arrays["w2"], trainer.initial["w2"])


def test_mirror_images_double_the_calibration_and_hold_out_the_held_out_mirrors(tmp_path):
    """Each calibration image and its horizontal mirror are fitted; the mirror of a held-out
    image is held out too, so held-out errors stay errors on images the fit never saw."""
    from tvm_rebirth.learn.finetune import _held_out, _with_mirrors

    images = RNG.standard_normal((64, 4, 32, 32)).astype(np.float32)
    doubled, held = _with_mirrors(images, _held_out(images))
    assert doubled.shape == (128, 4, 32, 32) and held.sum() == 16
    np.testing.assert_array_equal(doubled[64:], images[..., ::-1])
    np.testing.assert_array_equal(held[64:], held[:64])
    model = flow.load(chain_model(tmp_path / "net.onnx", ["relu", "max_pool2d"]))
    plan = flow.find_plan(model)
    for mirror, held_out in ((True, 16), (False, 8)):
        _, report = finetune(model, plan, images, reconstruct_epochs=0, mirror=mirror)
        assert report["mirror_images"] is mirror
        assert [s["held_out_images"] for s in report["sites"]] == [held_out]


def test_captures_built_once_compute_what_each_slimmed_network_computes():
    """The fine-tune's captures, built as one module before any weight is learned, give
    what the network slimmed with the learned weights computes when built on its own: the
    inputs of fmnist-inception's last site (every site before it slimmed, consumers
    refitted) and the inputs of that site's block. A network that is not the one a capture
    was built for gets None (the caller builds it)."""
    from tvm_rebirth.learn.captures import SlimmedCaptures
    from tvm_rebirth.learn.finetune import BlockEnd, capture_requests
    from tvm_rebirth.learn.train import LearnedWeights, compute_vars, region_inputs
    from tvm_rebirth.passes import analyze_sites, site_conv_weights, weight_keys

    model = flow.load("fmnist-inception")
    plan = flow.find_plan(model)
    learned = [s for s in plan.enabled_sites() if not s.exact]
    assert len(learned) == len(plan.sites) > 2
    last = learned[-1]
    site_convs = {c.replaces for s in learned for c in s.old_conv}
    requests = capture_requests(model, plan, learned, {}, [], site_convs,
                                {last.id: BlockEnd("output", 10 ** 6)})
    assert set(requests) == {("inputs", s.id) for s in learned} | {("block", last.id)}
    captures = SlimmedCaptures(requests)
    block = requests[("block", last.id)]
    # "learned" weights: the structure's placeholders, perturbed (a streamline site whose
    # convs a branch site slims again has its own placeholders)
    arrays = {k: a for s in learned if s.kind == "streamline"
              for (_, *keys), pair in zip(weight_keys(s), site_conv_weights(s, None))
              for k, a in zip(keys, pair)}
    for request in requests.values():
        graph = Dataflow(request.func)
        arrays.update(LearnedWeights(graph, graph.bindings, request.trainable).initial)
    arrays = {k: (v * (1 + 0.2 * RNG.standard_normal(v.shape))).astype(np.float32)
              for k, v in arrays.items()}
    assert any("/refit/" in k for k in arrays)
    images = RNG.random((3, *next(iter(model.input_shapes.values()))[1:]), dtype=np.float32)

    def plain(ids):
        slim = rebirth_pipeline(plan.with_enabled(lambda s: s.id in ids), arrays)(model.mod)
        return analyze_sites(relax.transform.ToNonDataflow()(slim), plan.policy)

    before = plain({s.id for s in learned[:-1]})
    trace = before.trace(last.id)
    func = before.mod["main"]
    variables = [trace.fork] if last.kind == "branch" else list(trace.inputs)
    got = captures.run(("inputs", last.id), func, variables, images, "test")
    for g, w in zip(got, compute_vars(func, variables, images, "test")):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    after = plain({s.id for s in learned})
    func = after.mod["main"]
    ends = [after.mod["main"].body.body]
    trainable = {n: k for n, k in block.trainable.items() if k[0].startswith(last.id + "/")}
    variables = region_inputs(func, trainable, ends)
    got = captures.run(("block", last.id), func, variables, images, "test")
    for g, w in zip(got, compute_vars(func, variables, images, "test")):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
    # not the network it was built for: one more site slimmed; one fewer
    assert captures.run(("inputs", last.id), func, variables, images, "test") is None
    func, variables = before.mod["main"], variables[:1]
    assert captures.run(("block", last.id), func, variables, images, "test") is None


def test_default_calibration_count_is_sized_for_the_model(tmp_path):
    """Small models get up to 2048 images, big ones 256, a multiple of 64 in between; the
    count follows the model's multiply-adds per image."""
    from tvm_rebirth.frontend.loader import load_model
    from tvm_rebirth.learn.calib import CALIBRATION_MACS, default_image_count
    from tvm_rebirth.learn.train import function_macs

    counts = {}
    for width, side in ((4, 12), (64, 224), (256, 224)):
        g = GraphMaker((1, 3, side, side))
        model = load_model(g.save(tmp_path / f"net{width}.onnx",
                                  [g.relu(g.conv("data", "conv1", width), "relu1")]))
        macs = function_macs(model.mod["main"])
        assert macs == side * side * width * 3 * 9  # one 3x3 conv, same padding
        counts[width] = default_image_count(model)
    assert counts[4] == 2048 and counts[256] == 256
    assert counts[64] % 64 == 0 and 256 < counts[64] < 2048
    assert counts[64] == CALIBRATION_MACS // (224 * 224 * 64 * 27) // 64 * 64
