"""Pictures: detection overlays and per-stage parity error plots."""
from __future__ import annotations

import colorsys

import cv2
import numpy as np


def palette(n: int) -> list[tuple[int, int, int]]:
    """n distinct BGR colours (golden-ratio hues)."""
    out = []
    for i in range(max(n, 1)):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95)
        out.append((int(b * 255), int(g * 255), int(r * 255)))
    return out


def draw_detections(image_bgr: np.ndarray, det: dict, classes=None, score_thr: float = 0.3,
                    alpha: float = 0.45) -> np.ndarray:
    """Boxes, translucent masks and ``class score`` labels on a copy of the image (BGR)."""
    img = image_bgr.copy()
    labels = np.asarray(det["labels"])
    n_cls = len(classes) if classes else (int(labels.max()) + 1 if labels.size else 1)
    colors = palette(n_cls)
    keep = np.asarray(det["scores"]) >= score_thr
    if "masks" in det:
        overlay = img.copy()
        for m, lab in zip(np.asarray(det["masks"])[keep], labels[keep]):
            overlay[m] = colors[int(lab) % len(colors)]
        img = cv2.addWeighted(overlay, alpha, img, 1 - alpha, 0)
    thick = max(1, round(max(img.shape[:2]) / 400))
    for box, lab, sc in zip(np.asarray(det["bboxes"])[keep], labels[keep], np.asarray(det["scores"])[keep]):
        c = colors[int(lab) % len(colors)]
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(img, (x1, y1), (x2, y2), c, thick)
        name = classes[int(lab)] if classes and int(lab) < len(classes) else str(int(lab))
        text = f"{name} {sc:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
        ty = max(y1, th + 4)
        cv2.rectangle(img, (x1, ty - th - 4), (x1 + tw + 4, ty), c, -1)
        cv2.putText(img, text, (x1 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return img


def plot_parity(rows, path, title="flaxdet parity: per-stage error"):
    """Bar chart of each float stage's scale-relative error against its tolerance (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.tol > 0 and np.isfinite(r.max_rel)
            and r.stage.split(".")[-1] not in ("order", "labels", "masks", "count")]
    names = [r.stage for r in rows]
    errs = [max(r.max_rel if r.max_rel > 0 else r.max_abs, 1e-12) for r in rows]
    tols = [r.tol for r in rows]
    fig, ax = plt.subplots(figsize=(max(8, 0.32 * len(rows)), 4.8))
    x = np.arange(len(rows))
    ax.bar(x, errs, color=["tab:green" if r.passed else "tab:red" for r in rows], label="error")
    ax.scatter(x, tols, marker="_", s=200, color="black", label="tolerance", zorder=3)
    ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("max error (scale-relative; px / abs for det & proposals)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
