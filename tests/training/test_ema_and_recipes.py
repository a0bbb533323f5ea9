"""EMA math (mmengine's ExpMomentumEMA, tied tensors lerped once per alias), the optimizers' schedules (every one
honours its warm-up; upstream RTMDet's recipe: warm-up, cosine, no decay on norms and biases), BN train-mode
selection (norm_eval / frozen_stages) -- all without a training step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flaxdet.nn import BatchNorm2d, Conv2d, Sequential
from parity_tests.goldens import GOLDENS


class _Toy(nnx.Module):
    """A conv shared by two branches (two visdet keys, one variable) and a BN per branch."""

    def __init__(self):
        conv = Conv2d(1, 2, 1, rngs=nnx.Rngs(0))
        self.a = nnx.List([Sequential(conv, BatchNorm2d(2)), Sequential(conv, BatchNorm2d(2))])
        self.head = Conv2d(2, 1, 1, rngs=nnx.Rngs(1))


def _flat(tree):
    from flaxdet.training.ema import _key

    return {_key(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("per_alias", [True, False], ids=["per_alias", "once"])
def test_ema_two_updates_by_hand(per_alias):
    """Update 0 copies; updates 1 and 2 lerp float entries with m_t = (1-mom) exp(-(1+t)/gamma) + mom, the shared
    conv once per key (2 here) in the per-alias mode; counters follow the model."""
    from flaxdet.training.ema import EMA, EMAConfig, alias_counts

    model = _Toy()
    assert alias_counts(model) == {f"a.{i}.0.{w}": 2 for i in (0, 1) for w in ("weight", "bias")}
    _, params, rest = nnx.split(model, nnx.Param, ...)
    mom, gamma = 0.1, 10.0
    ema = EMA(model, params, rest, EMAConfig(momentum=mom, gamma=gamma, per_alias=per_alias))
    thetas = [jax.tree.map(lambda x, c=c: x + c if jnp.issubdtype(x.dtype, jnp.floating) else x + int(c * 10), t)
              for c, t in ((0.0, (params, rest)), (1.0, (params, rest)), (3.0, (params, rest)))]
    for p, r in thetas:
        ema.update(p, r)
    assert ema.steps == 3
    got = _flat(ema.params) | _flat(ema.rest)
    srcs = [_flat(p) | _flat(r) for p, r in thetas]
    for key, value in got.items():
        k = 2 if per_alias and key.endswith(".0.weight") or per_alias and key.endswith(".0.bias") else 1
        if key.startswith("head"):
            k = 1
        if np.issubdtype(value.dtype, np.integer):  # num_batches_tracked: the model's
            np.testing.assert_array_equal(value, srcs[-1][key])
            continue
        e = srcs[0][key].astype(np.float64)
        for t in (1, 2):
            m = (1 - mom) * math.exp(-(1 + t) / gamma) + mom
            e = (1 - m) ** k * e + (1 - (1 - m) ** k) * srcs[t][key]
        np.testing.assert_allclose(value, e, rtol=1e-6, atol=1e-6, err_msg=key)
    # the shared conv moved further than a once-per-tensor EMA would have in the per-alias mode
    m1 = (1 - mom) * math.exp(-2 / gamma) + mom
    m2 = (1 - mom) * math.exp(-3 / gamma) + mom
    shared = got["a.0.0.bias"] - srcs[0]["a.0.0.bias"]
    want = (1 - (1 - m2) ** 2) * 3.0 + (1 - m2) ** 2 * (1 - (1 - m1) ** 2) * 1.0 if per_alias else \
        m2 * 3.0 + (1 - m2) * m1 * 1.0
    np.testing.assert_allclose(shared, want, rtol=1e-5)


def test_ema_momentum_matches_mmdetection():
    from flaxdet.training.ema import ema_momentum

    assert ema_momentum(1) == pytest.approx((1 - 2e-4) * math.exp(-2 / 2000) + 2e-4, rel=1e-15)
    assert ema_momentum(10 ** 6) == pytest.approx(2e-4, rel=1e-9)  # the floor


@pytest.mark.goldens
def test_rtmdet_alias_counts():
    """visdet's RTMDet head (share_conv): a tower conv has 3 keys (one per level), its BNs one; upstream's tied
    RTMDet-Ins (tie_reg_to_cls): 6 for the conv (3 levels x cls/reg), 2 for each level's BN."""
    import dataclasses

    from flaxdet.config import load_config
    from flaxdet.models import build_detector
    from flaxdet.training.ema import alias_counts

    def abstract(cfg):  # the module graph only: no weights initialised
        return nnx.eval_shape(lambda: build_detector(cfg))

    det = alias_counts(abstract(load_config(GOLDENS / "rtmdet" / "rtmdet_tiny" / "config.yaml")))
    assert det["bbox_head.cls_convs.2.1.conv.weight"] == 3 and det["bbox_head.reg_convs.0.0.conv.weight"] == 3
    assert "bbox_head.cls_convs.2.1.bn.weight" not in det  # not shared: one key
    cfg = load_config(GOLDENS / "rtmdet" / "rtmdet_ins_tiny" / "config.yaml")
    cfg = dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head, tie_reg_to_cls=True))
    ins = alias_counts(abstract(cfg))
    assert ins["bbox_head.cls_convs.0.0.conv.weight"] == 6 and ins["bbox_head.reg_convs.2.1.conv.weight"] == 6
    assert ins["bbox_head.cls_convs.1.0.bn.weight"] == 2 and ins["bbox_head.cls_convs.1.0.bn.running_mean"] == 2


def test_rtmdet_recipe_schedule():
    """rtmdet_adamw: LinearLR from 1e-5 over 1000 iterations, flat, cosine to 0.05 lr over the second half."""
    from flaxdet.training.optimizers import make_optimizer

    _, sched = make_optimizer("rtmdet_adamw", total_steps=4000)
    lr = 0.004
    expect = {0: lr * 1e-5, 500: lr * (1e-5 + (1 - 1e-5) * 0.5), 1000: lr, 2000: lr,
              3000: 0.05 * lr + 0.95 * lr * 0.5, 4000: 0.05 * lr,
              2500: 0.05 * lr + 0.95 * lr * (1 + math.cos(math.pi / 4)) / 2}
    for step, want in expect.items():
        assert float(sched(step)) == pytest.approx(want, rel=1e-5), step
    with pytest.raises(ValueError, match="total_steps"):
        make_optimizer("rtmdet_adamw")


@pytest.mark.parametrize("name", ["sgd", "adamw", "rtmdet_adamw"])
def test_every_optimizer_honours_warmup(name):
    from flaxdet.training.optimizers import DEFAULTS, make_optimizer

    _, sched = make_optimizer(name, lr=0.1, warmup_iters=30, total_steps=10 ** 6, steps_per_epoch=10 ** 5)
    ratio = DEFAULTS[name][3]
    assert float(sched(0)) == pytest.approx(0.1 * ratio, rel=1e-5)
    assert float(sched(15)) == pytest.approx(0.1 * (ratio + (1 - ratio) * 0.5), rel=1e-5)
    assert float(sched(30)) == pytest.approx(0.1, rel=1e-5)
    _, plain = make_optimizer("adamw", lr=0.1)  # visdet's SimpleRunner: no warm-up unless asked
    assert float(plain(0)) == pytest.approx(0.1)


def test_rtmdet_recipe_decay_mask():
    """No weight decay on biases and norm weights (paramwise norm_decay_mult=0, bias_decay_mult=0); conv weights
    decay: with zero gradients one AdamW step moves only the decayed tensors, by lr * wd * p."""
    from flaxdet.training.optimizers import decay_mask, make_optimizer

    model = _Toy()
    _, params, _ = nnx.split(model, nnx.Param, ...)
    mask = _flat(decay_mask(params))
    assert mask == {"a.0.0.bias": False, "a.0.0.weight": True, "a.0.1.bias": False, "a.0.1.weight": False,
                    "a.1.1.bias": False, "a.1.1.weight": False, "head.bias": False, "head.weight": True}
    tx, sched = make_optimizer("rtmdet_adamw", total_steps=10, warmup_iters=0)
    params = jax.tree.map(lambda x: x + 1.0, params)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    upd, p = _flat(updates), _flat(params)
    for k, decayed in mask.items():
        want = -0.004 * 0.05 * p[k] if decayed else np.zeros_like(p[k])
        np.testing.assert_allclose(upd[k], want, rtol=1e-5, err_msg=k)


@pytest.mark.goldens
def test_bn_train_mode_follows_norm_eval_and_frozen_stages():
    """RTMDet (norm_eval false, frozen_stages -1): every BN trains; frozen_stages 2 keeps the stem and stages 1-2
    in eval mode; norm_eval true keeps the whole backbone; the two-stage family's BN never trains."""
    import dataclasses

    from flaxdet.config import load_config
    from flaxdet.models import build_detector
    from flaxdet.training.step import bn_eval_prefixes, set_train_mode, trains_bn

    def training_bns(cfg):
        m = nnx.eval_shape(lambda: build_detector(cfg))
        set_train_mode(m)
        return {".".join(map(str, p)) for p, n in nnx.iter_graph(m)
                if isinstance(n, BatchNorm2d) and not n.use_running_average}, m

    cfg = load_config(GOLDENS / "rtmdet" / "rtmdet_tiny" / "config.yaml")
    all_bn, m = training_bns(cfg)
    assert bn_eval_prefixes(m) == () and trains_bn(m)
    assert "backbone.stem.0.bn" in all_bn and "bbox_head.cls_convs.2.1.bn" in all_bn
    frozen, m = training_bns(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, frozen_stages=2)))
    assert bn_eval_prefixes(m) == ("backbone.stem", "backbone.stage1", "backbone.stage2")
    assert frozen == {b for b in all_bn if not b.startswith(("backbone.stem.", "backbone.stage1.",
                                                              "backbone.stage2."))}
    evaled, _ = training_bns(dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, norm_eval=True)))
    assert evaled == {b for b in all_bn if not b.startswith("backbone.")}
    two, m = training_bns(load_config(GOLDENS / "mask_rcnn_tiny_r18" / "config.yaml"))
    assert two == set() and not trains_bn(m)
