"""Swin Transformer backbone (visdet ``models/backbones/swin.py``), same module names and state_dict keys:

    patch_embed.{proj,norm}
    stages.{s}.blocks.{b}.{norm1, attn.w_msa.{relative_position_bias_table, relative_position_index, qkv, proj},
                           norm2, ffn.layers.{0.0, 1}}
    stages.{s}.downsample.{reduction, norm}      (all stages but the last)
    norm{i}                                      (i in out_indices)

``relative_position_index`` is a persistent int64 buffer, as in visdet (its checkpoints carry it).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import nn

from flaxdet.config import SwinTransformerCfg
from flaxdet_reference.models.layers.transformer import FFN, DropPath, PatchEmbed, PatchMerging


def relative_position_index(wh: int, ww: int) -> np.ndarray:
    """(wh*ww, wh*ww) int64: row i, column j -> row of the bias table for the offset of token j from i.

    Token p = (y, x) at p = y*ww + x; offset (dy, dx) = (y_i - y_j, x_i - x_j) maps to
    (dy + wh - 1) * (2*ww - 1) + (dx + ww - 1). (visdet builds the same matrix as a flipped sum of
    two strided sequences.)"""
    ys, xs = np.divmod(np.arange(wh * ww), ww)
    dy = ys[:, None] - ys[None, :] + wh - 1
    dx = xs[:, None] - xs[None, :] + ww - 1
    return (dy * (2 * ww - 1) + dx).astype(np.int64)


def shift_attention_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
    """(num_windows, N, N) float32 additive mask of shifted-window attention on an hp x wp map
    (already padded to window multiples): after the cyclic shift, tokens of different original regions
    (3 x 3 bands: [0, -window), [-window, -shift), [-shift, end) per axis) must not attend: -100."""
    def bands(n):
        lab = np.zeros(n, np.int64)
        lab[n - window:n - shift] = 1
        lab[n - shift:] = 2
        return lab

    region = bands(hp)[:, None] * 3 + bands(wp)[None, :]
    win = region.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
    win = win.reshape(-1, window * window)
    return np.where(win[:, None, :] != win[:, :, None], np.float32(-100.0), np.float32(0.0)).astype(np.float32)


class WindowMSA(nn.Module):
    def __init__(self, embed_dims, num_heads, window_size, qkv_bias=True, qk_scale=None, attn_drop_rate=0.0,
                 proj_drop_rate=0.0):
        super().__init__()
        self.embed_dims, self.num_heads, self.window_size = embed_dims, num_heads, tuple(window_size)
        self.scale = qk_scale or (embed_dims // num_heads) ** -0.5
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", torch.from_numpy(relative_position_index(wh, ww)))
        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)

    def forward(self, x, mask=None):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (q * self.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(b // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        x = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class ShiftWindowMSA(nn.Module):
    def __init__(self, embed_dims, num_heads, window_size, shift_size=0, qkv_bias=True, qk_scale=None,
                 attn_drop_rate=0.0, proj_drop_rate=0.0, drop_path_rate=0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size {shift_size} must be in [0, window_size={window_size})")
        self.window_size, self.shift_size = window_size, shift_size
        self.w_msa = WindowMSA(embed_dims, num_heads, (window_size, window_size), qkv_bias, qk_scale,
                               attn_drop_rate, proj_drop_rate)
        self.drop = DropPath(drop_path_rate)

    def forward(self, query, hw_shape):
        b, n, c = query.shape
        h, w = hw_shape
        ws, sh = self.window_size, self.shift_size
        x = F.pad(query.view(b, h, w, c), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = x.shape[1], x.shape[2]
        mask = None
        if sh > 0:
            x = torch.roll(x, shifts=(-sh, -sh), dims=(1, 2))
            mask = torch.from_numpy(shift_attention_mask(hp, wp, ws, sh)).to(x.device)
        windows = x.view(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)
        out = self.w_msa(windows, mask=mask)
        x = out.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
        if sh > 0:
            x = torch.roll(x, shifts=(sh, sh), dims=(1, 2))
        x = x[:, :h, :w, :].reshape(b, h * w, c)
        return self.drop(x)


class SwinBlock(nn.Module):
    """Pre-norm: x + (S)W-MSA(LN(x)), then x + FFN(LN(x)); odd blocks of a stage shift by window // 2."""

    def __init__(self, embed_dims, num_heads, feedforward_channels, window_size=7, shift=False, qkv_bias=True,
                 qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, act_cfg=None,
                 norm_eps=1e-5, with_cp=False):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.attn = ShiftWindowMSA(embed_dims, num_heads, window_size, window_size // 2 if shift else 0, qkv_bias,
                                   qk_scale, attn_drop_rate, drop_rate, drop_path_rate)
        self.norm2 = nn.LayerNorm(embed_dims, eps=norm_eps)
        self.ffn = FFN(embed_dims, feedforward_channels, act_cfg, drop_rate, drop_path_rate)

    def forward(self, x, hw_shape):
        def inner(x):
            x = x + self.attn(self.norm1(x), hw_shape)
            return self.ffn(self.norm2(x), identity=x)

        return cp.checkpoint(inner, x, use_reentrant=False) if self.with_cp and x.requires_grad else inner(x)


class SwinBlockSequence(nn.Module):
    def __init__(self, embed_dims, num_heads, feedforward_channels, depth, window_size, qkv_bias, qk_scale,
                 drop_rate, attn_drop_rate, drop_path_rates, downsample, act_cfg, norm_eps, with_cp):
        super().__init__()
        self.blocks = nn.ModuleList([
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size, i % 2 == 1, qkv_bias, qk_scale,
                      drop_rate, attn_drop_rate, drop_path_rates[i], act_cfg, norm_eps, with_cp)
            for i in range(depth)])
        self.downsample = downsample

    def forward(self, x, hw_shape):
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is not None:
            x_down, down_hw = self.downsample(x, hw_shape)
            return x_down, down_hw, x, hw_shape
        return x, hw_shape, x, hw_shape


def _norm_eps(norm_cfg) -> float:
    cfg = dict(norm_cfg or {"type": "LN"})
    if cfg.get("type") != "LN":
        raise ValueError(f"SwinTransformer: unsupported norm_cfg {cfg!r} (only LN)")
    return float(cfg.get("eps", 1e-5))


def drop_path_rates(cfg: SwinTransformerCfg) -> list[float]:
    """visdet's stochastic depth rule: linspace(0, drop_path_rate, total blocks), in float32."""
    total = sum(cfg.depths)
    return [float(v) for v in torch.linspace(0, cfg.drop_path_rate, total)]


class SwinTransformer(nn.Module):
    def __init__(self, cfg: SwinTransformerCfg):
        super().__init__()
        self.cfg = cfg
        self.out_indices = tuple(cfg.out_indices)
        self.frozen_stages = cfg.frozen_stages
        self.use_abs_pos_embed = cfg.use_abs_pos_embed
        eps = _norm_eps(cfg.norm_cfg)
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.embed_dims, cfg.patch_size, cfg.strides[0],
                                      norm_cfg=cfg.norm_cfg if cfg.patch_norm else None)
        if cfg.use_abs_pos_embed:
            ph, pw = (cfg.pretrain_img_size,) * 2 if isinstance(cfg.pretrain_img_size, int) else (
                tuple(cfg.pretrain_img_size) * 2)[:2]
            self.absolute_pos_embed = nn.Parameter(
                torch.zeros(1, (ph // cfg.patch_size) * (pw // cfg.patch_size), cfg.embed_dims))
        self.drop_after_pos = nn.Dropout(cfg.drop_rate)
        dpr = drop_path_rates(cfg)
        self.stages = nn.ModuleList()
        c = cfg.embed_dims
        for i, depth in enumerate(cfg.depths):
            last = i == len(cfg.depths) - 1
            downsample = None if last else PatchMerging(c, 2 * c, cfg.strides[i + 1],
                                                        cfg.norm_cfg if cfg.patch_norm else None)
            start = sum(cfg.depths[:i])
            self.stages.append(SwinBlockSequence(
                c, cfg.num_heads[i], int(cfg.mlp_ratio * c), depth, cfg.window_size, cfg.qkv_bias, cfg.qk_scale,
                cfg.drop_rate, cfg.attn_drop_rate, dpr[start:start + depth], downsample, cfg.act_cfg, eps,
                cfg.with_cp))
            if downsample is not None:
                c = downsample.out_channels
        self.num_features = [int(cfg.embed_dims * 2**i) for i in range(len(cfg.depths))]
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i], eps=eps))
        self._freeze_stages()

    def _freeze_stages(self):
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for p in self.patch_embed.parameters():
                p.requires_grad = False
            if self.use_abs_pos_embed:
                self.absolute_pos_embed.requires_grad = False
            self.drop_after_pos.eval()
        for i in range(1, self.frozen_stages + 1):
            mods = [self.stages[i - 1]] + ([getattr(self, f"norm{i - 1}")] if (i - 1) in self.out_indices else [])
            for m in mods:
                m.eval()
                for p in m.parameters():
                    p.requires_grad = False

    def train(self, mode: bool = True):
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x):
        x, hw = self.patch_embed(x)
        if self.use_abs_pos_embed:
            x = x + self.absolute_pos_embed
        x = self.drop_after_pos(x)
        outs = []
        for i, stage in enumerate(self.stages):
            x, hw, out, out_hw = stage(x, hw)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *out_hw, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)
