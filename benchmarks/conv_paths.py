"""Each convolution path's achieved GFLOP/s against the measured matmul peaks: the 3x3 convolutions of Mask R-CNN
R50-FPN at 800x1333 (and its mask head), float32 and bf16.

    .venv/bin/python benchmarks/conv_paths.py [--repeats 5] [--out F]

Paths, each a jitted function of NHWC x HWIO operands, float32 results:

- ``xla``: XLA:CPU's convolution (``lax.conv_general_dilated``; bf16 operands with float32 accumulation);
- ``patches``: bf16 only, the formulation tried before oneDNN: per block of ~2688 output pixels (whole rows) the
  3x3 patches built in memory (copied as uint32 pairs of bf16, which XLA:CPU copies 2.5x faster than bf16) and
  contracted in one bf16 dot with float32 results -- a bf16 dot of that shape alone runs near the bf16 peak;
- ``onednn``: the ``onednn_conv`` fast path (oneDNN's convolution through the XLA FFI), where its library is built.

Also the XLA:CPU matmul peaks (2048^3, float32 and bf16 operands with float32 results) and PyTorch's convolution
(oneDNN inside torch, float32 and bf16, channels-last) on the same shapes. Median of ``--repeats`` after a warm-up.
Writes benchmarks/results/conv_paths.json.
"""
from __future__ import annotations

import argparse
import statistics

import common

# (name, N, H, W, C in, C out): stride-1 3x3 convolutions, padding 1
SHAPES = [("FPN P2 / RPN P2 output conv", 1, 200, 336, 256, 256), ("FPN P3 / RPN P3", 1, 100, 168, 256, 256),
          ("layer1 3x3", 1, 200, 336, 64, 64), ("layer2 3x3", 1, 100, 168, 128, 128),
          ("layer3 3x3", 1, 50, 84, 256, 256), ("layer4 3x3", 1, 25, 42, 512, 512),
          ("mask head, 100 RoIs", 100, 14, 14, 256, 256)]


def _median(fn, repeats):
    return statistics.median(common.timed(fn, repeats)[1])


def _patches(x, w, rows_px=2688):
    import jax
    import jax.numpy as jnp

    n, h, wd, c = x.shape
    co = w.shape[-1]
    u32 = jax.lax.bitcast_convert_type(x.reshape(n, h, wd, c // 2, 2), jnp.uint32)
    xp = jnp.pad(u32, ((0, 0), (1, 1), (1, 1), (0, 0)))
    w9 = w.reshape(9 * c, co)
    th = max(1, rows_px // wd)
    outs = []
    for r in range(0, h, th):
        t = min(th, h - r)
        blk = xp[:, r:r + t + 2]
        p = jnp.concatenate([blk[:, a:a + t, b:b + wd] for a in range(3) for b in range(3)], -1)
        p = jax.lax.bitcast_convert_type(p, jnp.bfloat16).reshape(n, t, wd, 9 * c)
        outs.append(jnp.einsum("nhwk,ko->nhwo", p, w9, preferred_element_type=jnp.float32))
    return jnp.concatenate(outs, 1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="JSON path (default benchmarks/results/conv_paths.json)")
    a = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from flaxdet.fast_paths import onednn

    common.torch_setup()
    machine = common.machine()
    peaks = common.matmul_peaks()
    have_onednn = onednn.available()
    print(f"XLA:CPU matmul peak: float32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s; onednn_conv "
          f"{'oneDNN ' + onednn.version() if have_onednn else 'unavailable: ' + str(onednn.unavailable_reason())}")
    xla = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None,
        preferred_element_type=jnp.float32)
    dnn = lambda x, w: onednn.conv(x, w, (1, 1), (1, 1), (1, 1))  # noqa: E731
    rows = []
    for name, n, h, wd, ci, co in SHAPES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, h, wd, ci), np.float32)
        w = (rng.standard_normal((3, 3, ci, co)) / np.sqrt(9 * ci)).astype(np.float32)
        gflop = 2 * 9 * ci * co * n * h * wd / 1e9
        row = dict(name=name, shape=[n, h, wd, ci, co], gflop=gflop, seconds={})
        for dt in ("float32", "bfloat16"):
            xj, wj = jnp.asarray(x, dt), jnp.asarray(w, dt)
            paths = [("xla", xla)] + ([("patches", _patches)] if dt == "bfloat16" else [])
            paths += [("onednn", dnn)] if have_onednn else []
            for path, fn in paths:
                f = jax.jit(fn)
                row["seconds"][f"{path} {dt}"] = _median(lambda f=f, xj=xj, wj=wj: f(xj, wj).block_until_ready(),
                                                         a.repeats)
            tdt = torch.float32 if dt == "float32" else torch.bfloat16
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).to(tdt).contiguous(memory_format=torch.channels_last)
            wt = torch.from_numpy(w).permute(3, 2, 0, 1).to(tdt).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                row["seconds"][f"pytorch {dt}"] = _median(
                    lambda xt=xt, wt=wt: torch.nn.functional.conv2d(xt, wt, padding=1), a.repeats)
        row["gflops"] = {k: gflop / v for k, v in row["seconds"].items()}
        rows.append(row)
        print(f"{name} ({n}x{h}x{wd}, {ci}->{co}, {gflop:.1f} GFLOP): "
              + ", ".join(f"{k} {v:.0f}" for k, v in row["gflops"].items()) + " GFLOP/s", flush=True)
    cols = sorted({k for r in rows for k in r["gflops"]}, key=lambda k: (k.split()[1], k))
    print()
    print(common.table(rows, [("convolution", "name", ""), ("GFLOP", "gflop", ".1f")]
                       + [(k + " GFLOP/s", lambda r, k=k: r["gflops"].get(k), ".0f") for k in cols]))
    print(f"matmul peak (XLA:CPU, 2048^3): float32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s")
    out = common.save("conv_paths.json", dict(benchmark="conv_paths", machine=machine, repeats=a.repeats,
                                              matmul_peak_gflops=peaks,
                                              onednn=onednn.version() if have_onednn else None, results=rows), a.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
