"""model/metrics.py against hand-computed values and scikit-learn (a dev requirement)."""
import numpy as np
import pytest
from sklearn import metrics as skm

from model.metrics import auc_binary, auc_ovr, classification_report, confusion_matrix, evaluate_probs, format_report

# 10 fixed predictions over 3 classes.
Y_TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
Y_PRED = [0, 0, 1, 2, 1, 1, 0, 2, 2, 1]


def test_confusion_and_report_match_hand_computation():
    conf = confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert conf.tolist() == [[2, 1, 1], [1, 2, 0], [0, 1, 2]]  # rows: true class
    r = classification_report(conf, ["a", "b", "c"])
    # precision = diagonal / column sum, recall = diagonal / row sum.
    p, rc = [2 / 3, 2 / 4, 2 / 3], [2 / 4, 2 / 3, 2 / 3]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, rc)]
    assert r["accuracy"] == pytest.approx(6 / 10)
    assert r["precision_macro"] == pytest.approx(np.mean(p))
    assert r["recall_macro"] == pytest.approx(np.mean(rc))
    assert r["f1_macro"] == pytest.approx(np.mean(f1))
    assert [row["support"] for row in r["per_class"]] == [4, 3, 3]
    assert [row["f1"] for row in r["per_class"]] == pytest.approx(f1)
    assert r["confusion"] == conf.tolist()


def test_report_matches_sklearn_including_empty_classes():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 5, 200))
    y_pred[y_pred == 3] = 4  # class 3 is never predicted: precision undefined -> 0
    y_true[y_true == 1] = 0  # class 1 never occurs: recall undefined -> 0
    r = classification_report(confusion_matrix(y_true, y_pred, 5), list("abcde"))
    labels = list(range(5))
    assert np.array_equal(r["confusion"], skm.confusion_matrix(y_true, y_pred, labels=labels))
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for avg_key, fn in [("precision_macro", skm.precision_score), ("recall_macro", skm.recall_score),
                        ("f1_macro", skm.f1_score)]:
        assert r[avg_key] == pytest.approx(fn(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    p, rc, f, s = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    assert [row["precision"] for row in r["per_class"]] == pytest.approx(p)
    assert [row["recall"] for row in r["per_class"]] == pytest.approx(rc)
    assert [row["f1"] for row in r["per_class"]] == pytest.approx(f)


def test_auc_handles_ties_and_matches_sklearn():
    assert auc_binary([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc_binary([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc_binary([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # 1 positive at 0.5 against negatives at 0.2, 0.5, 0.7: wins 1, ties 1 (= 1/2), loses 1 -> 1.5 / 3.
    assert auc_binary([1, 0, 0, 0], [0.5, 0.2, 0.5, 0.7]) == pytest.approx(0.5)
    assert auc_binary([1, 1], [0.1, 0.2]) is None
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + 1.5 * np.eye(4)[y]
    probs = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 2)  # rounding makes many ties
    probs /= probs.sum(1, keepdims=True)
    assert auc_ovr(y, probs) == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    for c, a in enumerate(auc_ovr(y, probs, average=None)):
        assert a == pytest.approx(skm.roc_auc_score(y == c, probs[:, c]))


def test_evaluate_probs_and_table():
    probs = np.full((10, 3), 0.1)
    probs[np.arange(10), Y_PRED] = 0.8
    r = evaluate_probs(Y_TRUE, probs, ["a", "b", "c"])
    assert r["confusion"] == confusion_matrix(Y_TRUE, Y_PRED, 3).tolist()
    assert r["log_loss"] == pytest.approx(skm.log_loss(Y_TRUE, probs))
    assert r["auc_macro"] == pytest.approx(skm.roc_auc_score(Y_TRUE, probs, multi_class="ovr"))
    assert list(r)[:5] == ["accuracy", "auc_macro", "log_loss", "f1_macro", "precision_macro"]
    table = format_report(r).splitlines()
    assert table[0].split()[:4] == ["class", "precision", "recall", "f1"]
    assert table[1].split() == ["a", "0.667", "0.500", "0.571", f"{r['per_class'][0]['auc']:.3f}", "4"]
    assert table[-1].startswith("accuracy 0.6000")
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
