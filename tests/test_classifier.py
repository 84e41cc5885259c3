"""The validator: architecture, preprocessing it owns, checkpoints, augmentation, training, CLIs."""
import json
import os
import signal
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from model.validator import augment as A
from model.validator import train as T
from model.validator.classifier import Classifier, load_classifier, load_pretrained, save_classifier
from model.data import PATHMNIST_CLASSES, load_split, resize_images
from model.io import UserError, cli, save_safetensors

SUBSET = os.path.join(os.path.dirname(__file__), "..", "examples", "pathmnist_subset_28.npz")


def make_clf(size=28, arch="resnet18", stem="small", seed=0):
    torch.manual_seed(seed)
    return Classifier(arch, stem, size, PATHMNIST_CLASSES, [0.7, 0.5, 0.7], [0.2, 0.25, 0.2]).eval()


def run_script(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py"] + argv)
    cli(module.main)


def test_small_images_get_the_stride_1_stem():
    shapes = {}
    for stem in ("small", "standard"):
        clf = make_clf(stem=stem)
        clf.net.layer4.register_forward_hook(lambda m, i, o, s=stem: shapes.__setitem__(s, o.shape[-1]))
        clf(torch.rand(2, 3, 28, 28))
    # 28 px: the 3x3/1 stem leaves 4x4 features at layer4; a 7x7/2 stem + max-pool leaves 1x1.
    assert shapes == {"small": 4, "standard": 1}
    assert make_clf(size=224, stem="standard")(torch.rand(1, 3, 224, 224)).shape == (1, 9)
    assert make_clf(arch="resnet50")(torch.rand(2, 3, 28, 28)).shape == (2, 9)


def test_predict_proba_any_size_rows_sum_to_one():
    clf = make_clf()
    for size in (28, 64, 256):
        p = clf.predict_proba(torch.rand(3, 3, size, size))
        assert p.shape == (3, 9) and (p >= 0).all()
        assert torch.allclose(p.sum(1), torch.ones(3), atol=1e-5)
    # A flat colour is the same flat colour at every size: the judgement must not depend on size.
    flat = torch.tensor([0.8, 0.4, 0.6]).view(1, 3, 1, 1)
    p28 = clf.predict_proba(flat.expand(2, 3, 28, 28))
    assert torch.allclose(clf.predict_proba(flat.expand(2, 3, 512, 512)), p28, atol=1e-5)
    # An SD-sized image is judged as its antialiased 28 px version, and uint8 as float / 255.
    big = torch.rand(2, 3, 256, 256)
    assert torch.allclose(clf.predict_proba(big), clf.predict_proba(resize_images(big, 28)), atol=1e-6)
    u8 = (torch.rand(2, 3, 28, 28) * 255).to(torch.uint8)
    assert torch.allclose(clf.predict_proba(u8), clf.predict_proba(u8.float() / 255), atol=1e-6)
    clf.train()
    clf.predict_proba(big)
    assert clf.training  # predict_proba uses eval mode but leaves the mode as it found it


def test_tta_judges_every_rotation_and_flip_alike():
    clf = make_clf()
    x = torch.rand(3, 3, 56, 56)
    views = [torch.rot90(x, k, (2, 3)) for k in range(4)] + [x.flip(-1), x.flip(-2).mT]
    plain = [clf.predict_proba(v) for v in views]
    assert max((p - plain[0]).abs().max().item() for p in plain) > 1e-3  # a random net sees orientation
    clf.tta = True
    tta = [clf.predict_proba(v) for v in views]
    assert all(torch.allclose(p, tta[0], atol=1e-6) for p in tta)
    assert torch.allclose(tta[0].sum(1), torch.ones(3), atol=1e-5)
    # ... and it is the mean of the 8 plain predictions.
    clf.tta = False
    d8 = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(-1)) for k in range(4)]
    assert torch.allclose(tta[0], torch.stack([clf.predict_proba(v) for v in d8]).mean(0), atol=1e-6)


def test_saved_classifier_reloads_identically(tmp_path):
    clf = make_clf()
    clf.tta = True
    clf.net.bn1.running_mean.uniform_()  # non-default buffers must survive too
    path = tmp_path / "c.safetensors"
    save_classifier(path, clf, epoch=7, data_fingerprint="abc", val_metrics={"accuracy": 0.5})
    back = load_classifier(path)
    x = torch.rand(4, 3, 40, 40)
    assert torch.equal(back.predict_proba(x), clf.predict_proba(x))
    assert back.config() == clf.config() and back.tta
    assert back.meta == {"epoch": 7, "data_fingerprint": "abc", "val_metrics": {"accuracy": 0.5}}
    save_safetensors(tmp_path / "other.safetensors", {"w": torch.zeros(2)})
    with pytest.raises(UserError, match="not a medsynth classifier"):
        load_classifier(tmp_path / "other.safetensors")


def test_pretrained_weights_fill_every_layer_that_fits(tmp_path):
    import torchvision
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18().state_dict()
    torch.save(imagenet, tmp_path / "r18.pth")
    clf = make_clf()
    fresh = load_pretrained(clf.net, "resnet18", str(tmp_path / "r18.pth"))
    assert fresh == ["conv1.weight", "fc.bias", "fc.weight"]  # 3x3 stem and 9-class head
    own = clf.net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in imagenet.items() if k not in fresh)
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(UserError, match="not resnet18 weights"):
        load_pretrained(clf.net, "resnet18", str(tmp_path / "r50.pth"))


def test_augmentations_are_label_preserving():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 3, 8, 8)
    y = A.flip_rotate(x, g)
    d4 = [torch.rot90(x, k, (2, 3)) for k in range(4)]
    d4 += [t.flip(-1) for t in d4]
    which = [[i for i, t in enumerate(d4) if torch.equal(y[n], t[n])] for n in range(64)]
    assert all(len(w) == 1 for w in which)  # every output is exactly one symmetry of its input
    assert len({w[0] for w in which}) == 8  # and all eight occur
    assert torch.allclose(A.zoom_crop(x, 1.0, g), x, atol=1e-6)
    zoomed = A.zoom_crop(x, 0.5, g)
    assert zoomed.shape == x.shape and not torch.allclose(zoomed, x, atol=1e-2)
    assert torch.allclose(A.hed_to_rgb(A.rgb_to_hed(x)), x.clamp_min(1e-6), atol=1e-4)
    assert torch.allclose(A.hed_jitter(x, 0.0, g), x, atol=1e-4)
    assert torch.allclose(A.brightness_contrast(x, 0.0, 0.0, g), x, atol=1e-6)
    # Haematoxylin-purple reads as haematoxylin, eosin-pink as eosin.
    hed = A.rgb_to_hed(torch.tensor([[0.35, 0.2, 0.6], [0.95, 0.55, 0.75]]).view(2, 3, 1, 1)).flatten(1)
    assert hed[0, 0] > hed[0, 1] and hed[1, 1] > hed[1, 0]
    out = A.augment(x, T.Recipe(hed_jitter=0.05, brightness=0.3, contrast=0.3), torch.Generator().manual_seed(3))
    again = A.augment(x, T.Recipe(hed_jitter=0.05, brightness=0.3, contrast=0.3), torch.Generator().manual_seed(3))
    assert torch.equal(out, again) and out.min() >= 0 and out.max() <= 1


def test_a_few_epochs_learn_real_tissue(tmp_path):
    train, val = load_split(SUBSET, "train"), load_split(SUBSET, "val")
    recipe = T.Recipe(epochs=4, batch_size=32, warmup_epochs=0.5, device="cpu")
    path = T.train(train, val, recipe, str(tmp_path))
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert len(log) == 4 and log[-1]["train_loss"] < log[0]["train_loss"] - 0.3
    best = max(log, key=lambda r: (r["val_f1"], -r["val_loss"]))
    assert best["val_acc"] > 0.35  # chance is 1/9
    clf = load_classifier(path)
    assert clf.meta["epoch"] == best["epoch"] and clf.meta["data_fingerprint"] == train.fingerprint
    metrics = json.load(open(tmp_path / "metrics.json"))
    assert metrics["best_epoch"] == best["epoch"] and metrics["val"]["f1_macro"] == pytest.approx(best["val_f1"])
    assert Image.open(tmp_path / "training_curve.png").size[0] > 100
    before = {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)}
    T.train(train, val, recipe, str(tmp_path))  # the same call again: a finished run is left as it is
    assert {f: (tmp_path / f).read_bytes() for f in os.listdir(tmp_path)} == before


def test_ctrl_c_saves_and_resume_continues_exactly(tmp_path, monkeypatch):
    train = load_split(SUBSET, "train", few_shot=4, size=12)
    val = load_split(SUBSET, "val", size=12, few_shot=1)
    recipe = T.Recipe(epochs=2, batch_size=12, warmup_epochs=0.5, ema=0.9, mixup=0.5, device="cpu")  # 3 steps/epoch
    T.train(train, val, recipe, str(tmp_path / "a"))

    calls = {"n": 0}
    real_augment = T.augment

    def augment_then_ctrl_c(x, r, g):
        calls["n"] += 1
        if calls["n"] == 5:  # in the middle of the second epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_augment(x, r, g)

    monkeypatch.setattr(T, "augment", augment_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        T.train(train, val, recipe, str(tmp_path / "b"))
    monkeypatch.setattr(T, "augment", real_augment)
    saved = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (1, 2)  # stopped cleanly after the 5th step
    with pytest.raises(UserError, match="other settings \\(lr=0.001\\)"):
        T.train(train, val, T.Recipe(**{**vars(recipe), "lr": 1e-4}), str(tmp_path / "b"), resume=True)
    T.train(train, val, recipe, str(tmp_path / "b"))  # the same call continues the run
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])
    assert not torch.equal(a["ema"]["fc.weight"], a["net"]["fc.weight"])
    assert (tmp_path / "a" / "log.jsonl").read_text().count("\n") == 2
    assert [r["train_loss"] for r in a["log"]] == [r["train_loss"] for r in b["log"]]
    # Other settings into a finished run: refused as above, started over with overwrite.
    with pytest.raises(UserError, match="other settings \\(lr=0.001\\).*--overwrite"):
        T.train(train, val, T.Recipe(**{**vars(recipe), "lr": 1e-4}), str(tmp_path / "b"))
    T.train(train, val, T.Recipe(**{**vars(recipe), "lr": 1e-4}), str(tmp_path / "b"), overwrite=True)
    redone = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert redone["recipe"]["lr"] == 1e-4 and len(redone["log"]) == 2
    assert json.load(open(tmp_path / "b" / "metrics.json"))["recipe"]["lr"] == 1e-4


def test_cli_train_then_evaluate_matches_sklearn(tmp_path, monkeypatch):
    import evaluate
    import train_classifier
    out = tmp_path / "clf"
    run_script(train_classifier, ["--data", SUBSET, "--out", str(out), "--few-shot", "3", "--epochs", "1",
                                  "--batch-size", "9", "--image-size", "16"], monkeypatch)
    assert sorted(os.listdir(out)) == ["classifier.safetensors", "log.jsonl", "metrics.json", "state.pt",
                                       "training_curve.png"]
    run_script(evaluate, ["classifier", "--classifier", str(out / "classifier.safetensors"), "--data", SUBSET,
                          "--out", str(tmp_path / "eval")], monkeypatch)
    m = json.load(open(tmp_path / "eval" / "metrics.json"))
    test = load_split(SUBSET, "test")
    probs = load_classifier(out / "classifier.safetensors").predict_proba(test.images).numpy()
    y, pred = test.labels.numpy(), probs.argmax(1)
    assert m["split"] == "test" and np.array_equal(m["confusion"], skm.confusion_matrix(y, pred, labels=range(9)))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(y, pred, average="macro", zero_division=0))
    assert m["precision_macro"] == pytest.approx(skm.precision_score(y, pred, average="macro", zero_division=0))
    assert m["recall_macro"] == pytest.approx(skm.recall_score(y, pred, average="macro", zero_division=0))
    assert m["auc_macro"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr"), abs=1e-6)
    assert [r["name"] for r in m["per_class"]] == PATHMNIST_CLASSES


def test_evaluate_on_fixed_predictions_matches_hand_computation(tmp_path, monkeypatch, capsys):
    import evaluate
    clf = make_clf()
    for p in clf.net.parameters():
        torch.nn.init.zeros_(p)
    clf.net.fc.bias.data[3] = 5.0  # every image -> "lymphocytes", with the same scores for all
    save_classifier(tmp_path / "c.safetensors", clf)
    np.savez(tmp_path / "t.npz", test_images=np.zeros((6, 28, 28, 3), np.uint8),
             test_labels=np.array([[3], [3], [0], [8], [8], [8]]))
    run_script(evaluate, ["classifier", "--classifier", str(tmp_path / "c.safetensors"),
                          "--data", str(tmp_path / "t.npz"), "--out", str(tmp_path / "e")], monkeypatch)
    m = json.load(open(tmp_path / "e" / "metrics.json"))
    want = np.zeros((9, 9), int)
    want[[3, 0, 8], 3] = [2, 1, 3]
    assert m["confusion"] == want.tolist()
    assert m["accuracy"] == pytest.approx(2 / 6)
    lym = m["per_class"][3]
    assert (lym["precision"], lym["recall"], lym["support"]) == (pytest.approx(2 / 6), 1.0, 2)
    assert lym["f1"] == pytest.approx(2 * (1 / 3) / (1 / 3 + 1))
    assert m["f1_macro"] == pytest.approx(lym["f1"] / 9) and m["recall_macro"] == pytest.approx(1 / 9)
    assert m["auc_macro"] == 0.5  # identical scores for every image: every comparison is a tie
    assert "lymphocytes" in capsys.readouterr().out
    assert Image.open(tmp_path / "e" / "confusion.png").size[0] > 300
