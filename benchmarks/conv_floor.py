"""How fast can a train step's convolutions be on this machine? Every convolution of one training forward, timed
alone, forward and backward, in PyTorch (oneDNN, as reference/ runs it) and in flaxdet (XLA:CPU with flaxdet's fast
paths: ``conv_vjp``, ``depthwise_taps``, ``conv1x1_matmul``), and summed three ways: PyTorch's, flaxdet's, and the
faster of the two per convolution ("best of both") -- what a step built from the better of the two libraries'
kernels would spend on convolutions. Beside them: the convolutions' FLOPs over the measured float32 matmul peak.

    .venv/bin/python benchmarks/conv_floor.py [--preset rtmdet_s] [--size 640x640] [--batch 8] [--repeats 3]
        [--out F]

The convolutions are read off reference/'s training forward (torch forward hooks on every ``Conv2d``; a conv
shared across FPN levels counts once per level). Backward = input gradient (except where the input is the image)
plus weight gradient; PyTorch's is (forward + backward) - forward. The step's other work (BatchNorm, SiLU, copies,
losses, the optimizer) is not in these sums. Writes benchmarks/results/conv_floor_<preset>.json.
"""
from __future__ import annotations

import argparse
import collections
import time

import common
import numpy as np


def conv_calls(preset, h, w, batch):
    """{(N, H, W, Cin, Cout, kh, kw, stride, padding, dilation, groups, input_needs_grad): calls} of one
    training forward of reference/'s ``preset`` on a ``batch`` x 3 x ``h`` x ``w`` input."""
    import torch
    from bench_rtmdet_train import _cfg

    from flaxdet.config import is_two_stage
    from flaxdet_reference import build_detector

    cfg = _cfg(preset)
    if is_two_stage(cfg):
        raise SystemExit("conv_floor.py reads the RTMDet presets' training forward (backbone, neck, head)")
    torch.manual_seed(0)
    m = build_detector(cfg).train()
    calls = collections.Counter()

    def hook(mod, inp, _out):
        x = inp[0]
        n, c, hh, ww = x.shape
        calls[(n, hh, ww, c, mod.out_channels, *mod.kernel_size, mod.stride[0], mod.padding[0], mod.dilation[0],
               mod.groups, bool(x.requires_grad))] += 1

    for mod in m.modules():
        if isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(hook)
    x = torch.rand(batch, 3, h, w)
    feats = m.extract_feat(x)
    m.bbox_head(feats)
    return calls


def flops(k):
    n, h, w, c, o, kh, kw, s, p, d, g, _ = k
    ho, wo = (h + 2 * p - d * (kh - 1) - 1) // s + 1, (w + 2 * p - d * (kw - 1) - 1) // s + 1
    return 2.0 * n * ho * wo * o * (c // g) * kh * kw


def _median(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_torch(k, repeats):
    import torch

    n, h, w, c, o, kh, kw, s, p, d, g, needs = k
    conv = torch.nn.Conv2d(c, o, (kh, kw), s, p, d, g, bias=True)
    x = torch.rand(n, c, h, w, requires_grad=needs)
    with torch.no_grad():
        fwd = _median(lambda: conv(x), repeats)
    gy = torch.ones_like(conv(x))

    def both():
        x.grad = None
        conv.weight.grad = conv.bias.grad = None
        conv(x).backward(gy)

    return fwd, max(_median(both, repeats) - fwd, 0.0)


def time_flaxdet(k, repeats):
    import jax
    import jax.numpy as jnp

    from flaxdet import nn

    n, h, w, c, o, kh, kw, s, p, d, g, needs = k
    wt = jnp.asarray(np.random.default_rng(0).standard_normal((kh, kw, c // g, o)).astype(np.float32) * 0.05)
    x = jnp.asarray(np.random.default_rng(1).random((n, h, w, c)).astype(np.float32))

    def f(x, wt):
        return nn.conv2d(x, wt, (s, s), (p, p), (d, d), g, None, jnp.float32)

    fwd_fn = jax.jit(f)
    gy = jnp.ones(fwd_fn(x, wt).shape, jnp.float32)
    if needs:
        bwd_fn = jax.jit(lambda x, wt, gy: jax.vjp(f, x, wt)[1](gy))
    else:
        bwd_fn = jax.jit(lambda x, wt, gy: jax.vjp(lambda wt: f(x, wt), wt)[1](gy))
    fwd = _median(lambda: jax.block_until_ready(fwd_fn(x, wt)), repeats)
    bwd = _median(lambda: jax.block_until_ready(bwd_fn(x, wt, gy)), repeats)
    return fwd, bwd


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="rtmdet_s")
    p.add_argument("--size", default="640x640")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="JSON path (default benchmarks/results/conv_floor_<preset>.json)")
    a = p.parse_args(argv)

    common.torch_setup()
    h, w = (int(v) for v in a.size.split("x"))
    machine = common.machine()
    calls = conv_calls(a.preset, h, w, a.batch)
    peak = matmul_peak()
    rows, tot = [], collections.Counter()
    print(f"{len(calls)} distinct convolutions, {sum(calls.values())} calls; float32 matmul peak {peak:.0f} GFLOP/s")
    head = ("N H W Cin Cout k s g", "x", "GFLOP", "pt fwd", "fd fwd", "pt bwd", "fd bwd")
    print(f"{head[0]:>32} {head[1]:>2} " + " ".join(f"{h:>7}" for h in head[2:]) + " ms")
    for k, cnt in sorted(calls.items(), key=lambda kv: -flops(kv[0]) * kv[1]):
        pf, pb = time_torch(k, a.repeats)
        ff, fb = time_flaxdet(k, a.repeats)
        gf = flops(k)
        # the backward's FLOPs: the weight gradient, plus the input gradient where the input needs one
        gb = gf * (2 if k[-1] else 1)
        row = dict(shape=dict(zip(("n", "h", "w", "cin", "cout", "kh", "kw", "stride", "padding", "dilation",
                                   "groups", "input_grad"), k)),
                   calls=cnt, gflop_fwd=gf / 1e9, gflop_bwd=gb / 1e9, pytorch_fwd_ms=pf * 1e3,
                   pytorch_bwd_ms=pb * 1e3, flaxdet_fwd_ms=ff * 1e3, flaxdet_bwd_ms=fb * 1e3)
        rows.append(row)
        tot["gflop"] += cnt * (gf + gb) / 1e9
        tot["pytorch_s"] += cnt * (pf + pb)
        tot["flaxdet_s"] += cnt * (ff + fb)
        tot["best_of_both_s"] += cnt * (min(pf, ff) + min(pb, fb))
        n_, hh, ww, c, o, kh, kw, s, _, _, g, _ = k
        print(f"{n_:>3} {hh:>4} {ww:>4} {c:>4} {o:>4} {kh}x{kw} s{s} g{g:<4} {cnt:>2} {gf / 1e9:7.2f} {pf * 1e3:7.1f} "
              f"{ff * 1e3:7.1f} {pb * 1e3:7.1f} {fb * 1e3:7.1f}", flush=True)
    tot = dict(tot, matmul_peak_gflops=peak, at_matmul_peak_s=tot["gflop"] / peak)
    print({k: round(v, 3) for k, v in tot.items()})
    common.save(f"conv_floor_{a.preset}.json", dict(
        benchmark="conv_floor", machine=machine, preset=a.preset, size=a.size, batch=a.batch, repeats=a.repeats,
        totals=tot, convolutions=rows), a.out)


def matmul_peak(n=3072, repeats=5):
    """GFLOP/s of a float32 n x n x n matmul under XLA:CPU (the same order as torch's on this machine)."""
    import jax
    import jax.numpy as jnp

    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    f = jax.jit(lambda a: a @ a)
    return 2.0 * n ** 3 / _median(lambda: jax.block_until_ready(f(a)), repeats) / 1e9


if __name__ == "__main__":
    main()
