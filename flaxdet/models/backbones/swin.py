"""Swin Transformer backbone (visdet ``models/backbones/swin.py``), NHWC, static shapes.

Attribute tree = visdet's state_dict keys::

    patch_embed.{proj,norm}
    stages.{s}.blocks.{b}.{norm1, attn.w_msa.{relative_position_bias_table, relative_position_index, qkv, proj},
                           norm2, ffn.layers.{0.0, 1}}
    stages.{s}.downsample.{reduction, norm}      (all stages but the last)
    norm{i}                                      (i in out_indices)

visdet checkpoints carry ``relative_position_index`` (a persistent int64 buffer); flaxdet keeps it as
integer state (:class:`flaxdet.nn.Counter`, exported back as int64) and gathers the bias table with it,
as visdet does. Everything that depends only on shapes -- padding to window multiples, the cyclic shift,
the shifted-window attention mask -- is computed with numpy at trace time, so one compile per input size.

Training-time randomness (dropout, stochastic depth with visdet's linear ``drop_path_rate`` rule) is
applied only when ``__call__`` gets a PRNG ``key``; without one the backbone is deterministic (eval).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flaxdet.config import SwinTransformerCfg
from flaxdet.models.layers.transformer import FFN, PatchEmbed, PatchMerging, drop_path, dropout, split_key
from flaxdet.nn import PRECISION, Counter, LayerNorm, Linear


def window_relative_index(wh: int, ww: int) -> np.ndarray:
    """(wh*ww, wh*ww): bias-table row for query token i attending key token j of a window (row-major
    tokens), i.e. ((yi - yj) + wh - 1) * (2*ww - 1) + (xi - xj) + ww - 1."""
    y, x = np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    return ((y[:, None] - y[None, :] + wh - 1) * (2 * ww - 1) + (x[:, None] - x[None, :] + ww - 1)).astype(np.int32)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) float32: -100 between tokens that the cyclic shift brought from different
    regions of the padded hp x wp map (regions: visdet's slices [0:-window], [-window:-shift], [-shift:]
    per axis), 0 elsewhere."""
    img = np.zeros((hp, wp), np.float32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            img[hs, ws] = label
            label += 1
    win = img.reshape(hp // window, window, wp // window, window).swapaxes(1, 2).reshape(-1, window * window)
    diff = win[:, None, :] - win[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _trunc_normal(key, shape, std=0.02):
    return std * jax.random.truncated_normal(key, -2.0 / std, 2.0 / std, shape, jnp.float32)


class WindowMSA(nnx.Module):
    def __init__(self, embed_dims, num_heads, window_size, qkv_bias=True, qk_scale=None, attn_drop_rate=0.0,
                 proj_drop_rate=0.0, *, rngs: nnx.Rngs):
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.window_size = tuple(window_size)
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nnx.Param(
            _trunc_normal(rngs.params(), ((2 * wh - 1) * (2 * ww - 1), num_heads)))
        self.relative_position_index = Counter(jnp.asarray(window_relative_index(wh, ww)))
        self.qkv = Linear(embed_dims, embed_dims * 3, bias=qkv_bias, rngs=rngs)
        self.proj = Linear(embed_dims, embed_dims, rngs=rngs)
        self.attn_drop_rate, self.proj_drop_rate = attn_drop_rate, proj_drop_rate

    def __call__(self, x, mask=None, key=None):
        """x (num_windows*B, N, C); mask (num_windows, N, N) additive or None."""
        b, n, c = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, nh, c // nh)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (b, nh, n, hd)
        attn = jnp.einsum("bhqd,bhkd->bhqk", q * jnp.asarray(self.scale, q.dtype), k, precision=PRECISION)
        idx = self.relative_position_index[...].reshape(-1)
        bias = self.relative_position_bias_table[...][idx].reshape(n, n, nh).transpose(2, 0, 1)
        attn = attn + bias[None].astype(attn.dtype)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.reshape(b // nw, nw, nh, n, n) + mask[None, :, None].astype(attn.dtype)).reshape(b, nh, n, n)
        k_attn, k_proj = split_key(key, 2)
        attn = dropout(jax.nn.softmax(attn, axis=-1), self.attn_drop_rate, k_attn)
        out = jnp.einsum("bhqk,bhkd->bqhd", attn, v, precision=PRECISION).reshape(b, n, c)
        return dropout(self.proj(out), self.proj_drop_rate, k_proj)


class ShiftWindowMSA(nnx.Module):
    """(S)W-MSA on an NHWC map: zero-pad bottom/right to window multiples, cyclic shift by -shift (shifted
    blocks), attention within windows (masked across shift seams), undo, crop, drop_path."""

    def __init__(self, embed_dims, num_heads, window_size, shift_size=0, qkv_bias=True, qk_scale=None,
                 attn_drop_rate=0.0, proj_drop_rate=0.0, drop_path_rate=0.0, *, rngs: nnx.Rngs):
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size, self.drop_path_rate = window_size, shift_size, drop_path_rate
        self.w_msa = WindowMSA(embed_dims, num_heads, (window_size, window_size), qkv_bias, qk_scale,
                               attn_drop_rate, proj_drop_rate, rngs=rngs)

    def __call__(self, x, key=None):
        b, h, w, c = x.shape
        ws, sh = self.window_size, self.shift_size
        x = jnp.pad(x, ((0, 0), (0, (-h) % ws), (0, (-w) % ws), (0, 0)))
        hp, wp = x.shape[1], x.shape[2]
        mask = None
        if sh > 0:
            x = jnp.roll(x, (-sh, -sh), axis=(1, 2))
            mask = jnp.asarray(shifted_window_mask(hp, wp, ws, sh))
        windows = x.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        k_attn, k_drop = split_key(key, 2)
        out = self.w_msa(windows, mask, k_attn)
        x = out.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh > 0:
            x = jnp.roll(x, (sh, sh), axis=(1, 2))
        return drop_path(x[:, :h, :w], self.drop_path_rate, k_drop)


class SwinBlock(nnx.Module):
    """Pre-norm: x + (S)W-MSA(LN(x)), then x + FFN(LN(x)); odd blocks of a stage shift by window // 2."""

    def __init__(self, embed_dims, num_heads, feedforward_channels, window_size=7, shift=False, qkv_bias=True,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, act_cfg=None,
                 norm_eps=1e-5, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(embed_dims, eps=norm_eps)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size, window_size // 2 if shift else 0, qkv_bias,
                                   qk_scale, attn_drop_rate, drop_rate, drop_path_rate, rngs=rngs)
        self.norm2 = LayerNorm(embed_dims, eps=norm_eps)
        self.ffn = FFN(embed_dims, feedforward_channels, act_cfg, drop_rate, drop_path_rate, rngs=rngs)

    def __call__(self, x, key=None):
        k1, k2 = split_key(key, 2)
        x = x + self.attn(self.norm1(x), k1)
        return self.ffn(self.norm2(x), identity=x, key=k2)


class SwinBlockSequence(nnx.Module):
    def __init__(self, embed_dims, num_heads, feedforward_channels, depth, window_size, qkv_bias, qk_scale,
                 drop_rate, attn_drop_rate, drop_path_rates, downsample, act_cfg, norm_eps, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size, i % 2 == 1, qkv_bias, qk_scale,
                      drop_rate, attn_drop_rate, drop_path_rates[i], act_cfg, norm_eps, rngs=rngs)
            for i in range(depth)])
        self.downsample = downsample

    def __call__(self, x, key=None):
        """Returns (input of the next stage, this stage's output before downsampling)."""
        for block, k in zip(self.blocks, split_key(key, len(self.blocks))):
            x = block(x, k)
        return (self.downsample(x) if self.downsample is not None else x), x


def _norm_eps(norm_cfg) -> float:
    cfg = dict(norm_cfg or {"type": "LN"})
    if cfg.get("type") != "LN":
        raise ValueError(f"SwinTransformer: unsupported norm_cfg {cfg!r} (only LN)")
    return float(cfg.get("eps", 1e-5))


def drop_path_rates(cfg: SwinTransformerCfg) -> list[float]:
    """visdet's stochastic depth rule: rate grows linearly from 0 to drop_path_rate over all blocks."""
    return [float(v) for v in np.linspace(0.0, cfg.drop_path_rate, sum(cfg.depths), dtype=np.float32)]


class SwinTransformer(nnx.Module):
    def __init__(self, cfg: SwinTransformerCfg, *, rngs: nnx.Rngs):
        self.cfg = cfg
        eps = _norm_eps(cfg.norm_cfg)
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.embed_dims, cfg.patch_size, cfg.strides[0],
                                      norm_cfg=cfg.norm_cfg if cfg.patch_norm else None, rngs=rngs)
        if cfg.use_abs_pos_embed:
            size = cfg.pretrain_img_size
            ph, pw = (size, size) if isinstance(size, int) else (tuple(size) * 2)[:2]
            n = (ph // cfg.patch_size) * (pw // cfg.patch_size)
            self.absolute_pos_embed = nnx.Param(_trunc_normal(rngs.params(), (1, n, cfg.embed_dims)))
        dpr = drop_path_rates(cfg)
        stages, c = [], cfg.embed_dims
        for i, depth in enumerate(cfg.depths):
            last = i == len(cfg.depths) - 1
            downsample = None if last else PatchMerging(c, 2 * c, cfg.strides[i + 1],
                                                        cfg.norm_cfg if cfg.patch_norm else None, rngs=rngs)
            start = sum(cfg.depths[:i])
            stages.append(SwinBlockSequence(
                c, cfg.num_heads[i], int(cfg.mlp_ratio * c), depth, cfg.window_size, cfg.qkv_bias, cfg.qk_scale,
                cfg.drop_rate, cfg.attn_drop_rate, dpr[start:start + depth], downsample, cfg.act_cfg, eps,
                rngs=rngs))
            if downsample is not None:
                c = downsample.out_channels
        self.stages = nnx.List(stages)
        self.num_features = tuple(int(cfg.embed_dims * 2**i) for i in range(len(cfg.depths)))
        for i in cfg.out_indices:
            setattr(self, f"norm{i}", LayerNorm(self.num_features[i], eps=eps))

    def __call__(self, x, key=None):
        """x (B, H, W, in_channels) -> tuple of NHWC maps (B, ceil(H/4)/2^i, ..., C_i) for i in out_indices.
        ``key``: a PRNG key enables dropout and stochastic depth (training); None = inference."""
        k_pos, k_stages = split_key(key, 2)
        x = self.patch_embed(x)
        if self.cfg.use_abs_pos_embed:
            b, h, w, c = x.shape
            pos = self.absolute_pos_embed[...]
            if pos.shape[1] != h * w:
                raise ValueError(f"absolute_pos_embed holds {pos.shape[1]} positions, the input gives {h}x{w} "
                                 "patches (visdet only supports the pretraining size here)")
            x = x + pos.reshape(1, h, w, c).astype(x.dtype)
        x = dropout(x, self.cfg.drop_rate, k_pos)
        outs = []
        for i, (stage, k) in enumerate(zip(self.stages, split_key(k_stages, len(self.stages)))):
            x, out = stage(x, k)
            if i in self.cfg.out_indices:
                outs.append(getattr(self, f"norm{i}")(out))
        return tuple(outs)

    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parameter path prefixes visdet freezes for ``frozen_stages`` (dotted: ``stages.0`` is stage 0)."""
        k = self.cfg.frozen_stages
        if k < 0:
            return ()
        out = ["patch_embed"] + (["absolute_pos_embed"] if self.cfg.use_abs_pos_embed else [])
        for i in range(1, k + 1):
            if i - 1 in self.cfg.out_indices:
                out.append(f"norm{i - 1}")
            out.append(f"stages.{i - 1}")
        return tuple(out)
