"""The second judge: the ViT classifier (checkpoint, training, fidelity features) and
`evaluate.py generation --second-classifier`, scored on a fixture run against a hand count."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import train_classifier
from model.data import PATHMNIST_CLASSES, file_md5, load_split
from model.eval.fidelity import ClassifierFeatures
from model.eval.generation import second_judge
from model.io import UserError, cli, read_safetensors, save_safetensors, write_json
from model.reject.run_folder import read_manifest, write_manifest
from model.validator import train as T
from model.validator.classifier import VIT_CONFIG, Classifier, load_classifier, save_classifier

SUBSET = os.path.join(os.path.dirname(__file__), "..", "examples", "pathmnist_subset_28.npz")
TINY = {"patch_size": 4, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32,
        "dropout": 0.1, "attention_dropout": 0.0}
RED, BLUE = 0, 3  # the colour judge's verdicts: adipose for reddish images, lymphocytes for bluish ones


def run_script(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [module.__name__ + ".py"] + argv)
    cli(module.main)


def tiny_vit(seed=0, classes=PATHMNIST_CLASSES, size=16):
    torch.manual_seed(seed)
    clf = Classifier("vit", None, size, classes, [0.7, 0.5, 0.7], [0.2, 0.25, 0.2], vit=TINY).eval()
    torch.nn.init.normal_(clf.head.weight, std=0.5)  # torchvision starts the head at zero: all ties
    return clf


def colour_judge(classes=PATHMNIST_CLASSES):
    """A ViT whose verdict is the sign of (red - blue) over the whole image: one encoder block
    with uniform attention (q = k = 0) that averages the patch tokens into the class token."""
    clf = Classifier("vit", None, 16, classes, [0.5] * 3, [0.25] * 3,
                     vit={**TINY, "num_layers": 1, "num_heads": 1, "dropout": 0.0}).eval()
    net, d = clf.net, TINY["hidden_dim"]
    block = net.encoder.layers[0]
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for ln in (block.ln_1, block.ln_2, net.encoder.ln):
            ln.weight.fill_(1.0)
        net.conv_proj.weight[0, 0], net.conv_proj.weight[0, 2] = 1.0, -1.0  # token dim 0: sum of (r - b)
        block.self_attention.in_proj_weight[2 * d:] = torch.eye(d)  # values = tokens, queries = keys = 0
        block.self_attention.out_proj.weight.copy_(torch.eye(d))
        clf.head.weight[RED, 0], clf.head.weight[BLUE, 0] = 10.0, -10.0
    return clf


def coloured(red, n, seed):
    """n uint8 images (n, 3, 16, 16) of noise whose red (else blue) channel is brighter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 100, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    x[:, 0 if red else 2] += 150
    return x


def test_vit_checkpoint_reloads_with_its_config(tmp_path):
    clf = tiny_vit()
    clf.tta = True
    save_classifier(tmp_path / "v.safetensors", clf, epoch=3)
    back = load_classifier(tmp_path / "v.safetensors")
    x = torch.rand(5, 3, 40, 40)
    assert torch.equal(back.predict_proba(x), clf.predict_proba(x))
    assert back.predict_proba(x).argmax(1).unique().numel() > 1  # a random head: not a trivial tie
    _, meta = read_safetensors(tmp_path / "v.safetensors")
    assert json.loads(meta["arch"]) == "vit" and json.loads(meta["vit"]) == TINY
    assert json.loads(meta["stem"]) is None and back.vit == TINY and back.meta == {"epoch": 3}
    # 16 px in 4 px patches: 4 x 4 = 16 tokens and the class token
    assert back.net.encoder.pos_embedding.shape == (1, 17, 16)
    # The default config at 28 px: 7 x 7 patches + 1, 96 wide.
    assert Classifier("vit", None, 28, PATHMNIST_CLASSES, [0.5] * 3, [0.5] * 3).net.encoder.pos_embedding.shape \
        == (1, 50, VIT_CONFIG["hidden_dim"])
    # Weights of another ViT config under this metadata do not load silently.
    tensors, meta = read_safetensors(tmp_path / "v.safetensors")
    save_safetensors(tmp_path / "w.safetensors", tensors, {**meta, "vit": json.dumps({**TINY, "hidden_dim": 32})})
    with pytest.raises(UserError, match="weights do not match vit"):
        load_classifier(tmp_path / "w.safetensors")


def test_fidelity_features_of_a_vit_are_its_final_class_token():
    clf = tiny_vit()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    net = clf.net

    def class_token(x):  # torchvision's forward, up to the head: (B, 3, 16, 16) -> (B, 16)
        x = net._process_input((x - clf.mean) / clf.std)  # (B, 16 patches, 16)
        x = torch.cat([net.class_token.expand(len(x), -1, -1), x], dim=1)
        return net.encoder(x)[:, 0]

    with torch.no_grad():
        x = clf.prepare(images)  # (3, 3, 16, 16) in [0, 1]
        plain = class_token(x)
        assert torch.allclose(clf.head(plain), clf(x), atol=1e-5)
        assert torch.allclose(torch.as_tensor(ClassifierFeatures(clf)(images)).float(), plain, atol=1e-5)
        clf.tta = True  # the mean over the 8 rotations/flips, one row per image
        views = [torch.rot90(v, k, (2, 3)) for v in (x, x.flip(-1)) for k in range(4)]
        mean = torch.stack([class_token(v) for v in views]).mean(0)
        assert torch.allclose(torch.as_tensor(ClassifierFeatures(clf)(images)).float(), mean, atol=1e-5)


def test_a_tiny_vit_trains_through_the_cli_with_its_own_defaults(tmp_path, monkeypatch):
    out = tmp_path / "vit"
    argv = ["--arch", "vit", "--data", SUBSET, "--out", str(out), "--few-shot", "8", "--image-size", "16",
            "--batch-size", "12", "--epochs", "6", "--warmup-epochs", "1", "--no-tta", "--device", "cpu"]
    run_script(train_classifier, argv, monkeypatch)
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 6 and log[-1]["train_loss"] < log[0]["train_loss"] - 0.1
    recipe = json.load(open(out / "metrics.json"))["recipe"]
    # flags not given take the ViT's defaults, flags given are used as they are
    assert (recipe["arch"], recipe["lr"], recipe["weight_decay"]) == ("vit", T.VIT.lr, T.VIT.weight_decay)
    assert (recipe["epochs"], recipe["warmup_epochs"]) == (6, 1.0)
    clf = load_classifier(out / "classifier.safetensors")
    assert (clf.arch, clf.stem, clf.image_size, clf.vit, clf.tta) == ("vit", None, 16, VIT_CONFIG, False)
    # the class token and position embeddings are inputs, not weights: no weight decay on them
    groups = T._param_groups(clf.net, 0.05)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(clf.net.class_token) in no_decay and id(clf.net.encoder.pos_embedding) in no_decay
    assert id(clf.net.conv_proj.weight) not in no_decay and groups[0]["weight_decay"] == 0.05


def test_vit_settings_it_cannot_train_are_refused_before_the_folder_is_touched(tmp_path):
    train, val = load_split(SUBSET, "train", few_shot=1, size=16), load_split(SUBSET, "val", few_shot=1, size=16)
    (tmp_path / "log.jsonl").write_text("keep me\n")
    for recipe, message in [(T.Recipe(arch="vit", image_size=18), "multiple of 4, got 18"),
                            (T.Recipe(arch="vit", pretrained="DEFAULT"), "trains from scratch")]:
        with pytest.raises(UserError, match=message):
            T.train(train, val, recipe, str(tmp_path), overwrite=True)
    assert (tmp_path / "log.jsonl").read_text() == "keep me\n"


# Kept images of the fixture run: (class, index) -> is the image reddish. The colour judge says
# adipose for red and lymphocytes for blue, so by hand: adipose 2 of 3 agree, lymphocytes 2 of 2,
# normal mucosa 0 of 1; 4 of 6 overall.
KEPT = {(0, 0): True, (0, 1): False, (0, 2): True, (3, 0): False, (3, 1): False, (6, 0): True}


def fixture_run(folder):
    """A sample_validated.py-like folder: the kept images above, and a rejected blue candidate of
    lymphocytes in rejected/ that must not count (it would be an agreement)."""
    rows = []
    for k, ((c, i), red) in enumerate(KEPT.items()):
        name = PATHMNIST_CLASSES[c]
        rows.append({"file": f"{name}/{name}_{i:04d}.png", "class_index": c, "class_name": name, "prompt": "p",
                     "seed": k, "attempt": 1, "predicted_index": c, "prob_prompted": 0.9, "accepted": 1, "index": i,
                     "image": coloured(red, 1, seed=k)[0]})
    rows.append({"file": "rejected/lymphocytes_0002_a1.png", "class_index": 3, "class_name": "lymphocytes",
                 "prompt": "p", "seed": 99, "attempt": 1, "predicted_index": 6, "prob_prompted": 0.1, "accepted": 0,
                 "index": 2, "image": coloured(False, 1, seed=99)[0]})
    for r in rows:
        path = os.path.join(folder, r["file"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(np.ascontiguousarray(r.pop("image").permute(1, 2, 0).numpy())).save(path)
    write_manifest(folder, rows)
    write_json(os.path.join(folder, "run.json"), {"settings": {"max_attempts": 3, "classifier_md5": "0" * 32},
                                                  "classes": PATHMNIST_CLASSES})


def test_the_colour_judge_sees_colour():
    judge = colour_judge()
    assert judge.predict_proba(coloured(True, 4, seed=5)).argmax(1).tolist() == [RED] * 4
    assert judge.predict_proba(coloured(False, 4, seed=6)).argmax(1).tolist() == [BLUE] * 4


def test_second_judge_agreement_is_the_hand_count(tmp_path):
    fixture_run(str(tmp_path))
    save_classifier(tmp_path / "judge.safetensors", colour_judge())
    got = second_judge(str(tmp_path), load_classifier(tmp_path / "judge.safetensors"), "judge.safetensors")
    assert got["kept"] == 6 and got["agreement"] == pytest.approx(4 / 6) and got["arch"] == "vit"
    assert got["per_class"] == pytest.approx({"adipose": 2 / 3, "lymphocytes": 1.0, "normal_colon_mucosa": 0.0})
    # all 7 first attempts, the rejected blue lymphocytes candidate too (an agreement): 5 of 7
    assert got["first_attempt_agreement"] == pytest.approx(5 / 7)
    # a folder made elsewhere (no manifest) is read by class sub-folder name, all its images
    (tmp_path / "manifest.csv").unlink()
    got = second_judge(str(tmp_path), colour_judge(), "judge.safetensors")
    assert got["kept"] == 6 and got["agreement"] == pytest.approx(4 / 6)


def test_cli_writes_the_second_judge_into_metrics_json(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fixture_run(str(run))
    save_classifier(tmp_path / "judge.safetensors", colour_judge())
    run_script(evaluate, ["generation", "--run", str(run), "--second-classifier", str(tmp_path / "judge.safetensors"),
                          "--device", "cpu"], monkeypatch)
    m = json.load(open(run / "metrics.json"))
    judge = m["second_judge"]
    assert set(judge) == {"agreement", "per_class", "kept", "arch", "classifier", "first_attempt_agreement"}
    assert (judge["agreement"], judge["kept"], judge["arch"]) == (pytest.approx(4 / 6), 6, "vit")
    assert judge["per_class"]["lymphocytes"] == 1.0 and judge["per_class"]["normal_colon_mucosa"] == 0.0
    assert judge["classifier"] == os.path.abspath(tmp_path / "judge.safetensors")
    assert m["source"] == "manifest" and m["n_first_attempt"] == 7  # the run's own scores are still there
    assert "0.667 of 6 kept images" in capsys.readouterr().out
    # the run's own validator as its "second" judge: said so on stderr
    write_json(str(run / "run.json"), {"settings": {"classifier_md5": file_md5(tmp_path / "judge.safetensors")},
                                       "classes": PATHMNIST_CLASSES})
    run_script(evaluate, ["generation", "--run", str(run), "--second-classifier", str(tmp_path / "judge.safetensors"),
                          "--device", "cpu"], monkeypatch)
    assert "is the run's own validator" in capsys.readouterr().err


def test_a_judge_of_other_classes_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    fixture_run(str(run))
    swapped = list(PATHMNIST_CLASSES)
    swapped[3], swapped[4] = swapped[4], swapped[3]  # lymphocytes at another index
    save_classifier(tmp_path / "judge.safetensors", colour_judge(swapped))
    with pytest.raises(SystemExit) as e:
        run_script(evaluate, ["generation", "--run", str(run), "--second-classifier",
                              str(tmp_path / "judge.safetensors"), "--device", "cpu"], monkeypatch)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "class 3 is not 'lymphocytes'" in err
    assert not (run / "metrics.json").exists()


def test_first_attempt_agreement_needs_every_rejected_image(tmp_path):
    """Without --keep-rejected a first attempt has no image: no first-attempt figure, rather than
    one computed on the kept images alone."""
    fixture_run(str(tmp_path))
    (tmp_path / "rejected" / "lymphocytes_0002_a1.png").unlink()
    got = second_judge(str(tmp_path), colour_judge(), "judge.safetensors")
    assert got["first_attempt_agreement"] is None and got["agreement"] == pytest.approx(4 / 6)


def test_a_run_with_no_kept_image_is_judged_on_its_first_attempts(tmp_path):
    fixture_run(str(tmp_path))
    rows = read_manifest(str(tmp_path))
    for r in rows:  # every candidate rejected, its image moved where --keep-rejected puts it
        if r["accepted"]:
            os.rename(tmp_path / r["file"], tmp_path / "rejected" / f"{r['class_name']}_{r['index']:04d}_a1.png")
            r["accepted"], r["file"] = 0, ""
    write_manifest(str(tmp_path), rows)
    got = second_judge(str(tmp_path), colour_judge(), "judge.safetensors")
    assert got["agreement"] is None and got["kept"] == 0 and got["first_attempt_agreement"] == pytest.approx(5 / 7)
