"""Classification metrics from scratch (numpy only), shared by classifier and generation evaluation.

Conventions follow scikit-learn so results can be checked against it: confusion rows are the true
class and columns the predicted one; macro averages weight every class equally, including classes
with no support; an undefined precision/recall/F1 (nothing predicted or nothing to find) counts as 0
(sklearn's zero_division=0). AUC is one-vs-rest from ranks (Mann-Whitney U), ties counting half.
"""
import numpy as np


def confusion_matrix(y_true, y_pred, n):
    """(n, n) int64 counts; [i, j] = images of true class i predicted as j."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if y_true.size and (min(y_true.min(), y_pred.min()) < 0 or max(y_true.max(), y_pred.max()) >= n):
        raise ValueError(f"labels must lie in 0..{n - 1}")
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def _safe_div(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def classification_report(conf, classes):
    """Accuracy, macro precision/recall/F1, per-class rows and the confusion matrix, as a JSON-able dict."""
    conf = np.asarray(conf, dtype=np.int64)
    tp = np.diag(conf)
    support, predicted = conf.sum(axis=1), conf.sum(axis=0)
    precision, recall = _safe_div(tp, predicted), _safe_div(tp, support)
    f1 = _safe_div(2 * tp, support + predicted)  # = 2PR / (P + R), and 0 where that is undefined
    return {
        "accuracy": float(_safe_div(tp.sum(), conf.sum())),
        "f1_macro": float(f1.mean()),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "n": int(conf.sum()),
        "per_class": [{"name": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(classes, precision, recall, f1, support)],
        "confusion": conf.tolist(),
    }


def _average_ranks(x):
    """1-based ranks of x; tied values share the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]  # first element of each run of equal values
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(new) - 1]
    return ranks


def auc_binary(is_pos, scores):
    """Area under the ROC curve = P(score of a random positive > that of a random negative), ties 1/2."""
    is_pos = np.asarray(is_pos, dtype=bool)
    n_pos, n_neg = is_pos.sum(), (~is_pos).sum()
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[is_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auc_ovr(y_true, probs, average="macro"):
    """One-vs-rest AUC of each class (None where a class is absent or is all there is); the macro
    mean over the defined ones when average="macro" (None if no class is defined)."""
    y_true, probs = np.asarray(y_true), np.asarray(probs)
    per_class = [auc_binary(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    if average is None:
        return per_class
    defined = [a for a in per_class if a is not None]
    return float(np.mean(defined)) if defined else None


def evaluate_probs(y_true, probs, classes):
    """Report for predicted probabilities (N, C): argmax metrics + AUC + mean negative log-likelihood."""
    y_true, probs = np.asarray(y_true, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    report = classification_report(confusion_matrix(y_true, probs.argmax(axis=1), len(classes)), classes)
    per_class_auc = auc_ovr(y_true, probs, average=None)
    for row, auc in zip(report["per_class"], per_class_auc):
        row["auc"] = auc
    p_true = np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, None)
    head = {"accuracy": report.pop("accuracy"), "auc_macro": auc_ovr(y_true, probs),
            "log_loss": float(-np.log(p_true).mean()) if len(y_true) else None}
    return {**head, **report}


def format_report(report):
    """A per-class text table with the macro averages and accuracy under it."""
    rows = report["per_class"]
    width = max(12, *(len(r["name"]) for r in rows))
    fmt = lambda v: "    -" if v is None else f"{v:.3f}"
    has_auc = "auc" in rows[0] if rows else False
    lines = [f"{'class':<{width}}  precision  recall     f1" + ("    auc" if has_auc else "") + "  support"]
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {fmt(r['precision']):>9}  {fmt(r['recall']):>6}  {fmt(r['f1']):>5}"
                     + (f"  {fmt(r['auc']):>5}" if has_auc else "") + f"  {r['support']:>7}")
    lines.append(f"{'macro':<{width}}  {fmt(report['precision_macro']):>9}  {fmt(report['recall_macro']):>6}  "
                 f"{fmt(report['f1_macro']):>5}" + (f"  {fmt(report.get('auc_macro')):>5}" if has_auc else "")
                 + f"  {report['n']:>7}")
    lines.append(f"accuracy {report['accuracy']:.4f}" +
                 (f"   auc_macro {fmt(report['auc_macro'])}" if report.get("auc_macro") is not None else ""))
    return "\n".join(lines)
