"""visdet YAML model configs as typed, frozen dataclasses.

visdet builds models from nested dicts whose ``type:`` key names a class
(``configs/models/*.yaml``, or the ``model`` section of a runner config). We
read such a dict **once**, here, into frozen dataclasses -- one per visdet
module, with fields named like that module's constructor arguments. Model code
(``flaxdet_reference`` and ``flaxdet.models``) only ever sees these dataclasses.

* ``TYPE_TABLE`` is the one explicit map from ``type`` strings to dataclasses.
  A field whose annotation is a typed base (``BackboneCfg`` ...) accepts any
  table entry derived from that base; anything else is an error.
* Untyped sub-dicts (``train_cfg.rpn``, ``nms``, ``norm_cfg`` ...) parse into the
  field's annotated dataclass; there ``type`` (if any) is an ordinary field.
* Unknown keys and unknown types raise :class:`ConfigError` naming the key path
  and the file. Lists become tuples so every config is hashable (usable as a
  static argument under ``jax.jit``).
* A field flaxdet parses but does not act on (``UNHONOURED``) is a :class:`ConfigError` naming the key
  path and the file unless it holds the value flaxdet implements (visdet's default): never a silent no-op.

``to_dict`` writes a config back in visdet's schema (``type:`` keys), so a
converted checkpoint can carry its config to visdet unchanged.
"""
from __future__ import annotations

import dataclasses
import functools
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A config that does not describe a model we support."""


class FrozenMap(Mapping):
    """A hashable, read-only dict for free-form config values (``init_cfg`` ...)."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping | None = None):
        self._items = tuple((k, _freeze(v)) for k, v in (items or {}).items())

    def __getitem__(self, key):
        for k, v in self._items:
            if k == key:
                return v
        raise KeyError(key)

    def __iter__(self):
        return (k for k, _ in self._items)

    def __len__(self):
        return len(self._items)

    def __hash__(self):
        return hash(self._items)

    def __eq__(self, other):
        return isinstance(other, Mapping) and dict(self) == dict(other)

    def __repr__(self):
        return f"FrozenMap({dict(self)!r})"


def _freeze(v):
    if isinstance(v, Mapping) and not isinstance(v, FrozenMap):
        return FrozenMap(v)
    if isinstance(v, list | tuple):
        return tuple(_freeze(x) for x in v)
    return v


# --------------------------------------------------------------------------------------
# Bases. ``TYPE`` is the visdet class name of table entries; plain sub-configs keep None.
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cfg:
    TYPE: ClassVar[Optional[str]] = None


class BackboneCfg(Cfg): ...
class NeckCfg(Cfg): ...
class DenseHeadCfg(Cfg): ...
class RoIHeadCfg(Cfg): ...
class BBoxHeadCfg(Cfg): ...
class MaskHeadCfg(Cfg): ...
class RoIExtractorCfg(Cfg): ...
class RoILayerCfg(Cfg): ...
class PriorGeneratorCfg(Cfg): ...
class BBoxCoderCfg(Cfg): ...
class LossCfg(Cfg): ...
class AssignerCfg(Cfg): ...
class SamplerCfg(Cfg): ...
class DetectorCfg(Cfg): ...
class PreprocessorCfg(Cfg): ...


# ------------------------------------------------------------------- plain sub-configs
@dataclass(frozen=True)
class NormCfg(Cfg):
    type: str = "BN"
    requires_grad: bool = True
    eps: float = 1e-5
    momentum: float = 0.1


@dataclass(frozen=True)
class NMSCfg(Cfg):
    type: str = "nms"
    iou_threshold: float = 0.5
    split_thr: int = 10000
    class_agnostic: bool = False


@dataclass(frozen=True)
class RPNProposalCfg(Cfg):
    """``test_cfg.rpn`` and ``train_cfg.rpn_proposal``."""
    nms_pre: int = 1000
    max_per_img: int = 1000
    nms: NMSCfg = field(default_factory=lambda: NMSCfg(iou_threshold=0.7))
    min_bbox_size: float = 0
    score_thr: float = 0.0


@dataclass(frozen=True)
class RCNNTestCfg(Cfg):
    score_thr: float = 0.05
    nms: NMSCfg = field(default_factory=NMSCfg)
    max_per_img: int = 100
    mask_thr_binary: float = 0.5


# ------------------------------------------------------------------ task modules
@dataclass(frozen=True)
class MaxIoUAssignerCfg(AssignerCfg):
    TYPE: ClassVar[str] = "MaxIoUAssigner"
    pos_iou_thr: float = 0.5
    neg_iou_thr: Union[float, tuple] = 0.5
    min_pos_iou: float = 0.0
    gt_max_assign_all: bool = True
    ignore_iof_thr: float = -1
    ignore_wrt_candidates: bool = True
    match_low_quality: bool = True
    gpu_assign_thr: float = -1
    iou_calculator: Optional[FrozenMap] = None


@dataclass(frozen=True)
class RandomSamplerCfg(SamplerCfg):
    TYPE: ClassVar[str] = "RandomSampler"
    num: int = 512
    pos_fraction: float = 0.25
    neg_pos_ub: float = -1
    add_gt_as_proposals: bool = True


@dataclass(frozen=True)
class RPNTrainCfg(Cfg):
    assigner: AssignerCfg = field(default_factory=lambda: MaxIoUAssignerCfg(0.7, 0.3, 0.3))
    sampler: SamplerCfg = field(default_factory=lambda: RandomSamplerCfg(256, 0.5, -1, False))
    allowed_border: int = -1
    pos_weight: float = -1
    debug: bool = False


@dataclass(frozen=True)
class RCNNTrainCfg(Cfg):
    assigner: AssignerCfg = field(default_factory=lambda: MaxIoUAssignerCfg(0.5, 0.5, 0.5))
    sampler: SamplerCfg = field(default_factory=RandomSamplerCfg)
    mask_size: int = 28
    pos_weight: float = -1
    debug: bool = False


@dataclass(frozen=True)
class TrainCfg(Cfg):
    rpn: Optional[RPNTrainCfg] = None
    rpn_proposal: Optional[RPNProposalCfg] = None
    rcnn: Union[RCNNTrainCfg, tuple[RCNNTrainCfg, ...], None] = None


@dataclass(frozen=True)
class TestCfg(Cfg):
    rpn: Optional[RPNProposalCfg] = None
    rcnn: Optional[RCNNTestCfg] = None


@dataclass(frozen=True)
class AnchorGeneratorCfg(PriorGeneratorCfg):
    TYPE: ClassVar[str] = "AnchorGenerator"
    strides: tuple = (4, 8, 16, 32, 64)
    ratios: tuple = (0.5, 1.0, 2.0)
    scales: Optional[tuple] = None
    base_sizes: Optional[tuple] = None
    scale_major: bool = True
    octave_base_scale: Optional[float] = None
    scales_per_octave: Optional[int] = None
    centers: Optional[tuple] = None
    center_offset: float = 0.0


@dataclass(frozen=True)
class DeltaXYWHBBoxCoderCfg(BBoxCoderCfg):
    """visdet's coder: no dw/dh clamp. ``wh_ratio_clip`` is a flaxdet option (not a
    visdet argument): set it to 16/1000 for upstream MMDetection's clamp."""
    TYPE: ClassVar[str] = "DeltaXYWHBBoxCoder"
    target_means: tuple = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple = (1.0, 1.0, 1.0, 1.0)
    clip_border: bool = True
    wh_ratio_clip: Optional[float] = None


@dataclass(frozen=True)
class CrossEntropyLossCfg(LossCfg):
    TYPE: ClassVar[str] = "CrossEntropyLoss"
    use_sigmoid: bool = False
    use_mask: bool = False
    reduction: str = "mean"
    class_weight: Optional[tuple] = None
    ignore_index: Optional[int] = None
    loss_weight: float = 1.0
    avg_non_ignore: bool = False


@dataclass(frozen=True)
class L1LossCfg(LossCfg):
    TYPE: ClassVar[str] = "L1Loss"
    reduction: str = "mean"
    loss_weight: float = 1.0


@dataclass(frozen=True)
class SmoothL1LossCfg(LossCfg):
    TYPE: ClassVar[str] = "SmoothL1Loss"
    beta: float = 1.0
    reduction: str = "mean"
    loss_weight: float = 1.0


@dataclass(frozen=True)
class RoIAlignCfg(RoILayerCfg):
    TYPE: ClassVar[str] = "RoIAlign"
    output_size: Union[int, tuple] = 7
    sampling_ratio: int = 0
    aligned: bool = True
    pool_mode: str = "avg"
    spatial_scale: float = 1.0
    use_torchvision: bool = True


# ---------------------------------------------------------------------------- modules
@dataclass(frozen=True)
class DetDataPreprocessorCfg(PreprocessorCfg):
    TYPE: ClassVar[str] = "DetDataPreprocessor"
    mean: tuple = (123.675, 116.28, 103.53)
    std: tuple = (58.395, 57.12, 57.375)
    pad_size_divisor: int = 32
    pad_value: float = 0
    pad_mask: bool = False
    mask_pad_value: int = 0
    pad_seg: bool = False
    seg_pad_value: int = 255
    bgr_to_rgb: bool = False
    rgb_to_bgr: bool = False
    boxtype2tensor: bool = True
    non_blocking: bool = False
    batch_augments: Optional[tuple] = None


@dataclass(frozen=True)
class ResNetCfg(BackboneCfg):
    TYPE: ClassVar[str] = "ResNet"
    depth: int = 50
    in_channels: int = 3
    stem_channels: Optional[int] = None
    base_channels: int = 64
    num_stages: int = 4
    strides: tuple = (1, 2, 2, 2)
    dilations: tuple = (1, 1, 1, 1)
    out_indices: tuple = (0, 1, 2, 3)
    style: str = "pytorch"
    deep_stem: bool = False
    avg_down: bool = False
    frozen_stages: int = -1
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: NormCfg = field(default_factory=NormCfg)
    norm_eval: bool = True
    dcn: Optional[FrozenMap] = None
    stage_with_dcn: tuple = (False, False, False, False)
    plugins: Optional[tuple] = None
    with_cp: bool = False
    zero_init_residual: bool = True
    pretrained: Optional[str] = None
    init_cfg: Optional[FrozenMap] = None

    def __post_init__(self):  # visdet's ResNet.arch_settings
        if self.depth not in (18, 34, 50, 101, 152):
            raise ConfigError(f"{self.TYPE}: depth must be 18, 34, 50, 101 or 152, got {self.depth}")


@dataclass(frozen=True)
class ResNeXtCfg(ResNetCfg):
    """visdet/MMDetection ``ResNeXt``: a ResNet whose bottleneck 3x3 conv is grouped; the bottleneck
    width is ``floor(planes * base_width / base_channels) * groups`` (``groups == 1``: ``planes``)."""
    TYPE: ClassVar[str] = "ResNeXt"
    groups: int = 1
    base_width: int = 4

    def __post_init__(self):
        if self.depth not in (50, 101, 152):
            raise ConfigError(f"{self.TYPE}: depth must be 50, 101 or 152 (bottleneck blocks), got {self.depth}")


@dataclass(frozen=True)
class SwinTransformerCfg(BackboneCfg):
    """visdet ``SwinTransformer`` (the flagship ``mask_rcnn_swin_s`` preset): built by
    ``flaxdet/models/backbones/swin.py`` and ``reference/models/backbones/swin.py``."""
    TYPE: ClassVar[str] = "SwinTransformer"
    pretrain_img_size: Union[int, tuple] = 224
    in_channels: int = 3
    embed_dims: int = 96
    patch_size: int = 4
    window_size: int = 7
    mlp_ratio: float = 4
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    strides: tuple = (4, 2, 2, 2)
    out_indices: tuple = (0, 1, 2, 3)
    qkv_bias: bool = True
    qk_scale: Optional[float] = None
    patch_norm: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    use_abs_pos_embed: bool = False
    act_cfg: FrozenMap = field(default_factory=lambda: FrozenMap({"type": "GELU"}))
    norm_cfg: FrozenMap = field(default_factory=lambda: FrozenMap({"type": "LN"}))
    with_cp: bool = False
    attn_backend: str = "torch"
    pretrained: Optional[str] = None
    convert_weights: bool = False
    frozen_stages: int = -1
    init_cfg: Optional[FrozenMap] = None

    def __post_init__(self):  # visdet's SwinTransformer asserts, and what its shapes silently require
        n = len(self.depths)
        if len(self.num_heads) != n or len(self.strides) != n:
            raise ConfigError(f"{self.TYPE}: depths {self.depths}, num_heads {self.num_heads} and strides "
                              f"{self.strides} must have one entry per stage")
        if self.strides[0] != self.patch_size:
            raise ConfigError(f"{self.TYPE}: strides[0] must equal patch_size (non-overlapping patch embed)")
        if any(not 0 <= i < n for i in self.out_indices):
            raise ConfigError(f"{self.TYPE}: out_indices {self.out_indices} out of range for {n} stages")
        for s, heads in enumerate(self.num_heads):
            if (self.embed_dims * 2**s) % heads:
                raise ConfigError(f"{self.TYPE}: stage {s} width {self.embed_dims * 2**s} is not divisible "
                                  f"by its {heads} heads")
        if self.attn_backend not in ("torch", "flash"):
            raise ConfigError(f"{self.TYPE}: attn_backend must be 'torch' or 'flash', got {self.attn_backend!r}")
        if self.pretrained is not None and self.init_cfg is not None:
            raise ConfigError(f"{self.TYPE}: init_cfg and pretrained cannot be specified at the same time")


@dataclass(frozen=True)
class FPNCfg(NeckCfg):
    TYPE: ClassVar[str] = "FPN"
    in_channels: tuple = (256, 512, 1024, 2048)
    out_channels: int = 256
    num_outs: int = 5
    start_level: int = 0
    end_level: int = -1
    add_extra_convs: Union[bool, str] = False
    relu_before_extra_convs: bool = False
    no_norm_on_lateral: bool = False
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: Optional[FrozenMap] = None
    act_cfg: Optional[FrozenMap] = None
    upsample_cfg: FrozenMap = field(default_factory=lambda: FrozenMap({"mode": "nearest"}))
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class RPNHeadCfg(DenseHeadCfg):
    TYPE: ClassVar[str] = "RPNHead"
    in_channels: int = 256
    num_classes: int = 1
    feat_channels: int = 256
    num_convs: int = 1
    anchor_generator: PriorGeneratorCfg = field(default_factory=AnchorGeneratorCfg)
    bbox_coder: BBoxCoderCfg = field(default_factory=DeltaXYWHBBoxCoderCfg)
    reg_decoded_bbox: bool = False
    loss_cls: LossCfg = field(default_factory=lambda: CrossEntropyLossCfg(use_sigmoid=True))
    loss_bbox: LossCfg = field(default_factory=L1LossCfg)
    train_cfg: Optional[RPNTrainCfg] = None
    test_cfg: Optional[RPNProposalCfg] = None
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class SingleRoIExtractorCfg(RoIExtractorCfg):
    TYPE: ClassVar[str] = "SingleRoIExtractor"
    roi_layer: RoILayerCfg = field(default_factory=RoIAlignCfg)
    out_channels: int = 256
    featmap_strides: tuple = (4, 8, 16, 32)
    finest_scale: int = 56
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class ConvFCBBoxHeadCfg(BBoxHeadCfg):
    TYPE: ClassVar[str] = "ConvFCBBoxHead"
    num_shared_convs: int = 0
    num_shared_fcs: int = 0
    num_cls_convs: int = 0
    num_cls_fcs: int = 0
    num_reg_convs: int = 0
    num_reg_fcs: int = 0
    conv_out_channels: int = 256
    fc_out_channels: int = 1024
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: Optional[FrozenMap] = None
    # BBoxHead arguments
    with_avg_pool: bool = False
    with_cls: bool = True
    with_reg: bool = True
    roi_feat_size: int = 7
    in_channels: int = 256
    num_classes: int = 80
    bbox_coder: BBoxCoderCfg = field(
        default_factory=lambda: DeltaXYWHBBoxCoderCfg(target_stds=(0.1, 0.1, 0.2, 0.2)))
    predict_box_type: str = "hbox"
    reg_class_agnostic: bool = False
    reg_decoded_bbox: bool = False
    reg_predictor_cfg: Optional[FrozenMap] = None
    cls_predictor_cfg: Optional[FrozenMap] = None
    loss_cls: LossCfg = field(default_factory=CrossEntropyLossCfg)
    loss_bbox: LossCfg = field(default_factory=L1LossCfg)
    init_cfg: Optional[FrozenMap] = None

    def __post_init__(self):  # visdet's ConvFCBBoxHead constructor checks
        if self.num_shared_convs + self.num_shared_fcs + self.num_cls_convs + self.num_cls_fcs \
                + self.num_reg_convs + self.num_reg_fcs == 0:
            raise ConfigError(f"{self.TYPE}: needs at least one conv or fc")
        if (self.num_cls_convs > 0 or self.num_reg_convs > 0) and self.num_shared_fcs != 0:
            raise ConfigError(f"{self.TYPE}: cls/reg convs cannot follow shared fcs")


@dataclass(frozen=True)
class Shared2FCBBoxHeadCfg(ConvFCBBoxHeadCfg):
    TYPE: ClassVar[str] = "Shared2FCBBoxHead"
    num_shared_fcs: int = 2


@dataclass(frozen=True)
class Shared4Conv1FCBBoxHeadCfg(ConvFCBBoxHeadCfg):
    TYPE: ClassVar[str] = "Shared4Conv1FCBBoxHead"
    num_shared_convs: int = 4
    num_shared_fcs: int = 1


@dataclass(frozen=True)
class FCNMaskHeadCfg(MaskHeadCfg):
    TYPE: ClassVar[str] = "FCNMaskHead"
    num_convs: int = 4
    roi_feat_size: int = 14
    in_channels: int = 256
    conv_kernel_size: int = 3
    conv_out_channels: int = 256
    num_classes: int = 80
    class_agnostic: bool = False
    upsample_cfg: FrozenMap = field(
        default_factory=lambda: FrozenMap({"type": "deconv", "scale_factor": 2}))
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: Optional[FrozenMap] = None
    predictor_cfg: FrozenMap = field(default_factory=lambda: FrozenMap({"type": "Conv"}))
    loss_mask: LossCfg = field(
        default_factory=lambda: CrossEntropyLossCfg(use_mask=True))
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class StandardRoIHeadCfg(RoIHeadCfg):
    TYPE: ClassVar[str] = "StandardRoIHead"
    bbox_roi_extractor: Optional[RoIExtractorCfg] = None
    bbox_head: Optional[BBoxHeadCfg] = None
    mask_roi_extractor: Optional[RoIExtractorCfg] = None
    mask_head: Optional[MaskHeadCfg] = None
    shared_head: Optional[FrozenMap] = None
    train_cfg: Optional[RCNNTrainCfg] = None
    test_cfg: Optional[RCNNTestCfg] = None
    init_cfg: Optional[FrozenMap] = None


def _per_stage(value, n, what, head):
    """visdet's cascade heads take one config (shared by every stage) or a list with one per stage."""
    if value is None or isinstance(value, tuple):
        if value is not None and len(value) != n:
            raise ConfigError(f"{head}: {what} has {len(value)} entries for num_stages={n}")
        return value
    return (value,) * n


@dataclass(frozen=True)
class CascadeRoIHeadCfg(RoIHeadCfg):
    """visdet ``CascadeRoIHead``. ``bbox_roi_extractor``/``bbox_head``/``mask_roi_extractor``/``mask_head``
    take one config or a list (one per stage), as visdet; they are stored as per-stage tuples.
    ``train_cfg`` is a per-stage tuple (visdet asserts a list). ``mask_roi_extractor`` None: the mask
    branch shares the bbox extractors (visdet's ``share_roi_extractor``)."""
    TYPE: ClassVar[str] = "CascadeRoIHead"
    num_stages: int = 3
    stage_loss_weights: tuple = (1.0, 0.5, 0.25)
    bbox_roi_extractor: Union[RoIExtractorCfg, tuple[RoIExtractorCfg, ...], None] = None
    bbox_head: Union[BBoxHeadCfg, tuple[BBoxHeadCfg, ...], None] = None
    mask_roi_extractor: Union[RoIExtractorCfg, tuple[RoIExtractorCfg, ...], None] = None
    mask_head: Union[MaskHeadCfg, tuple[MaskHeadCfg, ...], None] = None
    shared_head: Optional[FrozenMap] = None
    train_cfg: Union[RCNNTrainCfg, tuple[RCNNTrainCfg, ...], None] = None
    test_cfg: Optional[RCNNTestCfg] = None
    init_cfg: Optional[FrozenMap] = None

    def __post_init__(self):  # visdet's CascadeRoIHead asserts
        n = self.num_stages
        if n < 1:
            raise ConfigError(f"{self.TYPE}: num_stages must be >= 1, got {n}")
        if self.bbox_roi_extractor is None or self.bbox_head is None:
            raise ConfigError(f"{self.TYPE}: bbox_roi_extractor and bbox_head are required")
        if self.shared_head is not None:
            raise ConfigError(f"{self.TYPE}: shared_head is not supported in Cascade R-CNN")
        if len(self.stage_loss_weights) != n:
            raise ConfigError(f"{self.TYPE}: stage_loss_weights {self.stage_loss_weights} needs one weight per "
                              f"stage (num_stages={n})")
        if self.train_cfg is not None and not isinstance(self.train_cfg, tuple):
            raise ConfigError(f"{self.TYPE}: train_cfg.rcnn must be a list with one entry per stage")
        for name in ("bbox_roi_extractor", "bbox_head", "mask_roi_extractor", "mask_head", "train_cfg"):
            object.__setattr__(self, name, _per_stage(getattr(self, name), n, name, self.TYPE))
        if self.mask_roi_extractor is not None and self.mask_head is None:
            raise ConfigError(f"{self.TYPE}: mask_roi_extractor without mask_head")
        object.__setattr__(self, "stage_loss_weights", tuple(float(w) for w in self.stage_loss_weights))


def final_bbox_head(roi_head_cfg):
    """The bbox head config that predicts (a cascade's last stage; the only one otherwise)."""
    bh = roi_head_cfg.bbox_head
    return bh[-1] if isinstance(bh, tuple) else bh


@dataclass(frozen=True)
class TwoStageDetectorCfg(DetectorCfg):
    TYPE: ClassVar[str] = "TwoStageDetector"
    backbone: BackboneCfg = field(default_factory=ResNetCfg)
    neck: Optional[NeckCfg] = None
    rpn_head: Optional[DenseHeadCfg] = None
    roi_head: Optional[RoIHeadCfg] = None
    train_cfg: Optional[TrainCfg] = None
    test_cfg: Optional[TestCfg] = None
    data_preprocessor: PreprocessorCfg = field(default_factory=DetDataPreprocessorCfg)
    init_cfg: Optional[FrozenMap] = None
    preset_meta: Optional[FrozenMap] = None  # visdet preset files carry aliases here


@dataclass(frozen=True)
class FasterRCNNCfg(TwoStageDetectorCfg):
    TYPE: ClassVar[str] = "FasterRCNN"


@dataclass(frozen=True)
class MaskRCNNCfg(TwoStageDetectorCfg):
    TYPE: ClassVar[str] = "MaskRCNN"


@dataclass(frozen=True)
class CascadeRCNNCfg(TwoStageDetectorCfg):
    TYPE: ClassVar[str] = "CascadeRCNN"


# ------------------------------------------------------------------- RTMDet family
def _bn(momentum=0.03, eps=0.001):  # the RTMDet modules' class default (the presets give SyncBN: 0.1 / 1e-5)
    return field(default_factory=lambda: NormCfg(eps=eps, momentum=momentum))


def _silu():
    return field(default_factory=lambda: FrozenMap({"type": "SiLU"}))


@dataclass(frozen=True)
class CSPNeXtCfg(BackboneCfg):
    TYPE: ClassVar[str] = "CSPNeXt"
    arch: str = "P5"
    deepen_factor: float = 1.0
    widen_factor: float = 1.0
    out_indices: tuple = (2, 3, 4)
    frozen_stages: int = -1
    use_depthwise: bool = False
    expand_ratio: float = 0.5
    arch_ovewrite: Optional[tuple] = None  # (sic) visdet's / mmdet's spelling
    spp_kernel_sizes: tuple = (5, 9, 13)
    channel_attention: bool = True
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: NormCfg = _bn()
    act_cfg: FrozenMap = _silu()
    norm_eval: bool = False
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class CSPNeXtPAFPNCfg(NeckCfg):
    TYPE: ClassVar[str] = "CSPNeXtPAFPN"
    in_channels: tuple = (256, 512, 1024)
    out_channels: int = 256
    num_csp_blocks: int = 3
    use_depthwise: bool = False
    expand_ratio: float = 0.5
    upsample_cfg: FrozenMap = field(default_factory=lambda: FrozenMap({"scale_factor": 2, "mode": "nearest"}))
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: NormCfg = _bn()
    act_cfg: FrozenMap = _silu()
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class MlvlPointGeneratorCfg(PriorGeneratorCfg):
    TYPE: ClassVar[str] = "MlvlPointGenerator"
    strides: tuple = (8, 16, 32)
    offset: float = 0.5


@dataclass(frozen=True)
class DistancePointBBoxCoderCfg(BBoxCoderCfg):
    TYPE: ClassVar[str] = "DistancePointBBoxCoder"
    clip_border: bool = True


@dataclass(frozen=True)
class QualityFocalLossCfg(LossCfg):
    TYPE: ClassVar[str] = "QualityFocalLoss"
    use_sigmoid: bool = True
    beta: float = 2.0
    reduction: str = "mean"
    loss_weight: float = 1.0
    activated: bool = False


@dataclass(frozen=True)
class GIoULossCfg(LossCfg):
    TYPE: ClassVar[str] = "GIoULoss"
    eps: float = 1e-6
    reduction: str = "mean"
    loss_weight: float = 1.0


@dataclass(frozen=True)
class DiceLossCfg(LossCfg):
    TYPE: ClassVar[str] = "DiceLoss"
    use_sigmoid: bool = True
    activate: bool = True
    reduction: str = "mean"
    naive_dice: bool = False
    loss_weight: float = 1.0
    eps: float = 1e-3


@dataclass(frozen=True)
class DynamicSoftLabelAssignerCfg(AssignerCfg):
    TYPE: ClassVar[str] = "DynamicSoftLabelAssigner"
    soft_center_radius: float = 3.0
    topk: int = 13
    iou_weight: float = 3.0
    iou_calculator: Optional[FrozenMap] = None


@dataclass(frozen=True)
class RTMDetTrainCfg(Cfg):
    """The single-stage ``train_cfg`` (handed to the head as its ``train_cfg``)."""
    assigner: AssignerCfg = field(default_factory=DynamicSoftLabelAssignerCfg)
    allowed_border: int = -1
    pos_weight: float = -1
    debug: bool = False


@dataclass(frozen=True)
class RTMDetTestCfg(Cfg):
    """The single-stage ``test_cfg``: per-level top ``nms_pre`` above ``score_thr``, class-wise NMS."""
    nms_pre: int = 30000
    min_bbox_size: float = 0
    score_thr: float = 0.001
    nms: NMSCfg = field(default_factory=lambda: NMSCfg(iou_threshold=0.65))
    max_per_img: int = 300
    mask_thr_binary: float = 0.5


@dataclass(frozen=True)
class RTMDetSepBNHeadCfg(DenseHeadCfg):
    """``num_classes`` is None in visdet's presets (visdet cannot build them as shipped): it then comes from the
    checkpoint's class-layer shapes or ``--num-classes``."""
    TYPE: ClassVar[str] = "RTMDetSepBNHead"
    num_classes: Optional[int] = None
    in_channels: int = 256
    feat_channels: int = 256
    stacked_convs: int = 2
    share_conv: bool = True
    use_depthwise: bool = False
    pred_kernel_size: int = 1
    exp_on_reg: bool = False
    with_objectness: bool = True
    anchor_generator: PriorGeneratorCfg = field(default_factory=lambda: MlvlPointGeneratorCfg(offset=0))
    bbox_coder: BBoxCoderCfg = field(default_factory=DistancePointBBoxCoderCfg)
    loss_cls: LossCfg = field(default_factory=QualityFocalLossCfg)
    loss_bbox: LossCfg = field(default_factory=lambda: GIoULossCfg(loss_weight=2.0))
    conv_cfg: Optional[FrozenMap] = None
    norm_cfg: NormCfg = _bn()
    act_cfg: FrozenMap = _silu()
    conv_bias: Union[bool, str] = "auto"
    train_cfg: Optional[RTMDetTrainCfg] = None
    test_cfg: Optional[RTMDetTestCfg] = None
    init_cfg: Optional[FrozenMap] = None


@dataclass(frozen=True)
class RTMDetInsSepBNHeadCfg(RTMDetSepBNHeadCfg):
    """The instance head: regression is ``relu(.) * stride`` (``exp_on_reg`` is not read), plus the kernel tower,
    ``mask_head`` (MaskFeatModule) and dynamic convs. ``tie_reg_to_cls`` (flaxdet's, default false = visdet):
    upstream MMDetection's reg tower *is* the cls tower."""
    TYPE: ClassVar[str] = "RTMDetInsSepBNHead"
    with_objectness: bool = False
    num_prototypes: int = 8
    dyconv_channels: int = 8
    num_dyconvs: int = 3
    mask_loss_stride: int = 4
    loss_mask: LossCfg = field(default_factory=lambda: DiceLossCfg(loss_weight=2.0, eps=5e-6))
    tie_reg_to_cls: bool = False


@dataclass(frozen=True)
class RTMDetCfg(DetectorCfg):
    """visdet ``RTMDet`` (a SingleStageDetector): backbone, neck, ``bbox_head``; ``train_cfg`` / ``test_cfg`` are
    handed to the head."""
    TYPE: ClassVar[str] = "RTMDet"
    backbone: BackboneCfg = field(default_factory=CSPNeXtCfg)
    neck: Optional[NeckCfg] = None
    bbox_head: Optional[DenseHeadCfg] = None
    train_cfg: Optional[RTMDetTrainCfg] = None
    test_cfg: Optional[RTMDetTestCfg] = None
    data_preprocessor: PreprocessorCfg = field(default_factory=DetDataPreprocessorCfg)
    use_syncbn: bool = True
    init_cfg: Optional[FrozenMap] = None
    preset_meta: Optional[FrozenMap] = None  # aliases, weights URL, img_scale


def is_two_stage(cfg) -> bool:
    return isinstance(cfg, TwoStageDetectorCfg)


def test_scale(cfg) -> tuple:
    """The keep-ratio resize bounds of the model's test pipeline: the preset's ``preset_meta.img_scale`` (RTMDet:
    640x640), else visdet's default (1333, 800) for two-stage models and (640, 640) for RTMDet."""
    meta = dict(getattr(cfg, "preset_meta", None) or {})
    if meta.get("img_scale"):
        return tuple(int(v) for v in meta["img_scale"])
    return (1333, 800) if is_two_stage(cfg) else (640, 640)


test_scale.__test__ = False  # not a pytest test, whatever imports it


def with_num_classes(cfg, state_dict=None, num_classes=None, source="the checkpoint", log=print):
    """An RTMDet config with ``bbox_head.num_classes`` set: from ``num_classes`` (``--num-classes``), which must
    agree with the checkpoint's class layer when there is one, else from that layer's shape
    (``bbox_head.rtm_cls.0.weight``: (classes, C, k, k)). Two-stage configs carry theirs and pass through."""
    if is_two_stage(cfg) or getattr(cfg, "bbox_head", None) is None:
        if num_classes is not None:
            raise ConfigError("--num-classes applies to RTMDet configs (two-stage configs carry num_classes)")
        return cfg
    w = (state_dict or {}).get("bbox_head.rtm_cls.0.weight")
    shape = tuple(int(s) for s in w.shape) if w is not None else None
    from_ckpt = shape[0] if shape else None
    given = num_classes if num_classes is not None else cfg.bbox_head.num_classes
    if given is not None and from_ckpt is not None and given != from_ckpt:
        what = "--num-classes" if num_classes is not None else "the config's bbox_head.num_classes"
        raise ConfigError(f"{what} is {given} but {source} has {from_ckpt} classes (bbox_head.rtm_cls.0.weight "
                          f"{shape})")
    n = given if given is not None else from_ckpt
    if n is None:
        raise ConfigError("bbox_head.num_classes is not set (visdet's RTMDet presets leave it out): pass "
                          "--num-classes, or a checkpoint to read it from")
    if cfg.bbox_head.num_classes is None:
        how = "--num-classes" if num_classes is not None else "the checkpoint's bbox_head.rtm_cls.0.weight"
        log(f"num_classes: {n} (from {how})")
    return dataclasses.replace(cfg, bbox_head=dataclasses.replace(cfg.bbox_head, num_classes=n))


# The one explicit table: visdet ``type`` string -> config dataclass.
TYPE_TABLE: dict[str, type[Cfg]] = {
    c.TYPE: c for c in (
        MaskRCNNCfg, FasterRCNNCfg, TwoStageDetectorCfg, DetDataPreprocessorCfg,
        ResNetCfg, ResNeXtCfg, SwinTransformerCfg, FPNCfg, RPNHeadCfg, AnchorGeneratorCfg, DeltaXYWHBBoxCoderCfg,
        StandardRoIHeadCfg, SingleRoIExtractorCfg, RoIAlignCfg,
        CascadeRCNNCfg, CascadeRoIHeadCfg,
        ConvFCBBoxHeadCfg, Shared2FCBBoxHeadCfg, Shared4Conv1FCBBoxHeadCfg, FCNMaskHeadCfg,
        CrossEntropyLossCfg, L1LossCfg, SmoothL1LossCfg,
        MaxIoUAssignerCfg, RandomSamplerCfg,
        RTMDetCfg, CSPNeXtCfg, CSPNeXtPAFPNCfg, RTMDetSepBNHeadCfg, RTMDetInsSepBNHeadCfg, MlvlPointGeneratorCfg,
        DistancePointBBoxCoderCfg, QualityFocalLossCfg, GIoULossCfg, DiceLossCfg, DynamicSoftLabelAssignerCfg,
    )
}


# ------------------------------------------------------------------------------ honesty
# Fields we parse but flaxdet's models and training do not act on: ``UNHONOURED`` entries are (config class,
# field path from it, (accepts(value, owner config), the accepted values in words), what visdet does with the
# field). Parsing raises a ConfigError naming the key path and the file for any other value -- a field is
# never a silent no-op. Fields only training reads (``TRAIN_ONLY``: losses, assigners, samplers, the backbone's
# norm_eval, neck/head norms, GT padding, ...) are checked by ``check_trainable`` when training is set up, so a
# config that predicts correctly still loads for inference.
#
# Accepted with no effect, as they change no numbers in visdet either or only its runner/initialisation reads
# them: type names; init_cfg, pretrained, convert_weights, zero_init_residual (initialisation: flaxdet loads
# converted weights); preset_meta; train_cfg *.debug (read by nothing); non_blocking, boxtype2tensor (host
# transfer, data containers); pad_seg, seg_pad_value (no semantic-segmentation GT); NormCfg.momentum (BN
# statistics never move under the required norm_eval=True); stage_with_dcn (dcn is refused); ignore_wrt_candidates
# (only with ignore_iof_thr > 0, refused); avg_non_ignore (every loss here has an avg_factor); NMSCfg.split_thr
# (class offsets or a per-class loop: the same NMS); and what visdet itself ignores: DeltaXYWHBBoxCoder.clip_border
# (clips iff max_shape), RoIAlign pool_mode / use_torchvision (always torchvision's average) / spatial_scale
# (1 / featmap stride), the RPN's score_thr, FCNMaskHead.roi_feat_size, SingleRoIExtractor.out_channels.
def _is(*values):
    return (lambda v, _: v in values), " or ".join(map(repr, values))


def _loss(**flags):
    ok = lambda v, _: isinstance(v, CrossEntropyLossCfg) and all(getattr(v, k) == f for k, f in flags.items())  # noqa: E731
    return ok, "CrossEntropyLoss with " + ", ".join(f"{k}: {str(f).lower()}" for k, f in flags.items())


_CONV = _is(None, {"type": "Conv"}, {"type": "Conv2d"}), "visdet: another conv layer (conv_cfg)"
_NORM = ((lambda v, _: v is None or (v.get("type") == "GN" and v.get("requires_grad", True)), "None or a trainable GN"),
         "visdet trains neck/head BN on batch statistics and freezes requires_grad: false norms; flaxdet keeps BN "
         "on running statistics and trains every norm outside the backbone")
_CP = _is(False), "visdet: gradient checkpointing, to save training memory"
_ACT = ((lambda v, _: v is not None and v.get("type") in ("SiLU", "Swish", "ReLU"), "SiLU, Swish or ReLU"),
        "visdet: another activation")
_MEAN = _is("mean"), "visdet: an unreduced or summed loss"

UNHONOURED = (
    (ResNetCfg, "with_cp", *_CP),
    (ResNetCfg, "norm_eval", _is(True), "visdet trains backbone BN on batch statistics; flaxdet uses running ones"),
    (ResNetCfg, "conv_cfg", *_CONV),
    (SwinTransformerCfg, "with_cp", *_CP),
    (SwinTransformerCfg, "attn_backend", _is("torch"), "visdet: a flash-attention kernel"),
    (SwinTransformerCfg, "norm_cfg", (lambda v, _: v.get("requires_grad", True), "a trainable LN"),
     "visdet: frozen LayerNorms"),
    (FPNCfg, "conv_cfg", *_CONV),
    (FPNCfg, "norm_cfg", *_NORM),
    (RPNHeadCfg, "reg_decoded_bbox", _is(False), "visdet: the box loss on decoded boxes"),
    (RPNHeadCfg, "loss_cls", _loss(use_sigmoid=True, use_mask=False),
     "flaxdet trains the RPN with sigmoid BCE; a softmax RPN only predicts"),
    (ConvFCBBoxHeadCfg, "conv_cfg", *_CONV),
    (ConvFCBBoxHeadCfg, "norm_cfg", *_NORM),
    (ConvFCBBoxHeadCfg, "reg_decoded_bbox", _is(False), "visdet: the box loss on decoded boxes"),
    (ConvFCBBoxHeadCfg, "loss_cls", _loss(use_sigmoid=False, use_mask=False),
     "flaxdet classifies RoIs with softmax CE"),
    (ConvFCBBoxHeadCfg, "reg_predictor_cfg", _is(None, {"type": "Linear"}), "visdet: another fc_reg layer"),
    (ConvFCBBoxHeadCfg, "cls_predictor_cfg", _is(None, {"type": "Linear"}), "visdet: another fc_cls layer"),
    (ConvFCBBoxHeadCfg, "predict_box_type", _is("hbox"), "visdet: rotated or other box types"),
    (FCNMaskHeadCfg, "conv_cfg", *_CONV),
    (FCNMaskHeadCfg, "norm_cfg", *_NORM),
    (FCNMaskHeadCfg, "predictor_cfg", _is({"type": "Conv"}, {"type": "Conv2d"}), "visdet: another conv_logits layer"),
    (FCNMaskHeadCfg, "loss_mask", _loss(use_mask=True), "flaxdet trains masks with mask_cross_entropy"),
    (CrossEntropyLossCfg, "class_weight", _is(None), "visdet: per-class CE weights"),
    (CrossEntropyLossCfg, "ignore_index", _is(None, -100), "visdet: a label left out of the loss"),
    (CrossEntropyLossCfg, "reduction", *_MEAN),
    (L1LossCfg, "reduction", *_MEAN),
    (SmoothL1LossCfg, "reduction", *_MEAN),
    (MaxIoUAssignerCfg, "neg_iou_thr", (lambda v, _: not isinstance(v, tuple), "a single float"),
     "visdet: a (min, max) IoU range for negatives"),
    (MaxIoUAssignerCfg, "ignore_iof_thr", (lambda v, _: v <= 0, "-1"),
     "visdet: candidates covering ignored (crowd) GT boxes are ignored; flaxdet has no ignored GTs"),
    (MaxIoUAssignerCfg, "gpu_assign_thr", (lambda v, _: v <= 0, "-1"),
     "visdet: assignment on the CPU above this many GTs, to save memory"),
    (MaxIoUAssignerCfg, "iou_calculator", _is(None, {"type": "BboxOverlaps2D"}), "visdet: scaled or fp16 IoUs"),
    (RPNTrainCfg, "sampler.add_gt_as_proposals", _is(False), "visdet: GT boxes join the RPN's sampled anchors"),
    (NMSCfg, "type", _is("nms"), "visdet: soft-NMS or another suppression"),
    (NMSCfg, "class_agnostic", _is(False), "visdet: one NMS over all classes"),
    (CSPNeXtCfg, "conv_cfg", *_CONV),
    (CSPNeXtPAFPNCfg, "conv_cfg", *_CONV),
    (RTMDetSepBNHeadCfg, "conv_cfg", *_CONV),
    (CSPNeXtCfg, "act_cfg", *_ACT),
    (CSPNeXtPAFPNCfg, "act_cfg", *_ACT),
    (RTMDetSepBNHeadCfg, "act_cfg", *_ACT),
    (DetDataPreprocessorCfg, "pad_size_divisor", _is(32),
     "visdet pads to this divisor; flaxdet's train loader pads to multiples of 32 (the anchors' valid flags)"),
    (DetDataPreprocessorCfg, "mask_pad_value", _is(0), "visdet pads GT masks with it; flaxdet with 0"),
    (DetDataPreprocessorCfg, "batch_augments", _is(None), "visdet: batch augmentations"),
    (TwoStageDetectorCfg, "data_preprocessor.pad_mask",
     (lambda v, c: v or getattr(c.roi_head, "mask_head", None) is None, "True (a model with masks)"),
     "visdet crops mask targets from unpadded GT masks when false; flaxdet pads them to the batch shape"),
)


# (config class, field) of UNHONOURED that only training reads: the predict path honours any value.
TRAIN_ONLY = frozenset(
    [(ResNetCfg, "with_cp"), (ResNetCfg, "norm_eval"), (SwinTransformerCfg, "with_cp"),
     (SwinTransformerCfg, "norm_cfg"),
     (RPNHeadCfg, "reg_decoded_bbox"), (RPNHeadCfg, "loss_cls"), (ConvFCBBoxHeadCfg, "reg_decoded_bbox"),
     (FCNMaskHeadCfg, "loss_mask"), (RPNTrainCfg, "sampler.add_gt_as_proposals"),
     (TwoStageDetectorCfg, "data_preprocessor.pad_mask")]
    + [(c, "norm_cfg") for c in (FPNCfg, ConvFCBBoxHeadCfg, FCNMaskHeadCfg)]
    + [(CrossEntropyLossCfg, f) for f in ("class_weight", "ignore_index", "reduction")]
    + [(c, "reduction") for c in (L1LossCfg, SmoothL1LossCfg)]
    + [(MaxIoUAssignerCfg, f) for f in ("neg_iou_thr", "ignore_iof_thr", "gpu_assign_thr", "iou_calculator")]
    + [(DetDataPreprocessorCfg, f) for f in ("pad_size_divisor", "mask_pad_value", "batch_augments")])


def _check_honoured(cfg: Cfg, path: str, source: str, training: bool = False) -> None:
    for owner, rel, (ok, accepted), why in UNHONOURED:
        if (owner, rel) in TRAIN_ONLY and not training:
            continue
        if isinstance(cfg, owner) and not ok(functools.reduce(getattr, rel.split("."), cfg), cfg):
            key = f"{path}.{rel}" if path else rel
            raise ConfigError(f"{_where(key, source)}: flaxdet does not honour this field ({why}); "
                              f"set it to {accepted}")


def _check_rtmdet_trainable(cfg, source: str) -> None:
    """What RTMDet training implements (visdet-rtmdet.md section 4): the RTMDet(Ins)SepBNHead / RTMDet(Ins)Head
    losses QualityFocalLoss (sigmoid, not pre-activated), GIoULoss and (Ins) DiceLoss, the DynamicSoftLabelAssigner
    over every valid prior (``allowed_border: -1``)."""
    head = cfg.bbox_head
    want = {"loss_cls": QualityFocalLossCfg, "loss_bbox": GIoULossCfg}
    if isinstance(head, RTMDetInsSepBNHeadCfg):
        want["loss_mask"] = DiceLossCfg
    for name, kind in want.items():
        if not isinstance(getattr(head, name), kind):
            raise ConfigError(f"{_where(f'bbox_head.{name}', source)}: flaxdet trains RTMDet with {kind.TYPE} only "
                              f"(got {getattr(head, name).TYPE})")
    if not head.loss_cls.use_sigmoid or head.loss_cls.activated:
        raise ConfigError(f"{_where('bbox_head.loss_cls', source)}: QualityFocalLoss trains with use_sigmoid: true "
                          "and activated: false only (as visdet's)")
    for name in want:
        if getattr(getattr(head, name), "reduction", "mean") != "mean":
            raise ConfigError(f"{_where(f'bbox_head.{name}.reduction', source)}: flaxdet does not honour this field "
                              "(visdet: an unreduced or summed loss); set it to 'mean'")
    if "loss_mask" in want and (not head.loss_mask.use_sigmoid or not head.loss_mask.activate
                                or head.loss_mask.naive_dice):
        raise ConfigError(f"{_where('bbox_head.loss_mask', source)}: DiceLoss trains with use_sigmoid: true, "
                          "activate: true and naive_dice: false only (the presets' values)")
    tc = cfg.train_cfg or head.train_cfg
    if tc is None:
        raise ConfigError(f"{_where('train_cfg', source)}: RTMDet training needs a train_cfg (the assigner)")
    if not isinstance(tc.assigner, DynamicSoftLabelAssignerCfg):
        raise ConfigError(f"{_where('train_cfg.assigner', source)}: flaxdet trains RTMDet with the "
                          f"DynamicSoftLabelAssigner only (got {tc.assigner.TYPE})")
    if tc.assigner.iou_calculator not in (None, {"type": "BboxOverlaps2D"}):
        raise ConfigError(f"{_where('train_cfg.assigner.iou_calculator', source)}: flaxdet does not honour this "
                          "field (visdet: scaled or fp16 IoUs); set it to None or {type: BboxOverlaps2D}")
    if tc.allowed_border != -1:
        raise ConfigError(f"{_where('train_cfg.allowed_border', source)}: flaxdet does not honour this field "
                          "(visdet: priors outside the image border excluded); set it to -1")


def check_trainable(cfg, source: str = "the model's config") -> None:
    """Raise a ConfigError naming the first field of ``cfg`` (a parsed model config) that flaxdet's training
    does not honour (``TRAIN_ONLY`` entries of ``UNHONOURED``); called when training is set up."""
    if isinstance(cfg, RTMDetCfg):
        _check_rtmdet_trainable(cfg, source)
    elif not is_two_stage(cfg):
        raise ConfigError(f"{source}: flaxdet does not train {cfg.TYPE} models (the two-stage family, RTMDet and "
                          "RTMDet-Ins train; conversion, parity and inference work for all)")

    def walk(c, path):
        _check_honoured(c, path, source, training=True)
        # the detector's own train_cfg first: the heads hold copies of its parts, the user wrote it there
        for f in sorted(dataclasses.fields(c), key=lambda f: f.name != "train_cfg"):
            v = getattr(c, f.name)
            for i, item in enumerate(v if isinstance(v, tuple) else (v,)):
                if dataclasses.is_dataclass(item):
                    sub = f"{path}.{f.name}" if path else f.name
                    walk(item, f"{sub}.{i}" if isinstance(v, tuple) else sub)

    walk(cfg, "")


# ----------------------------------------------------------------------------- parsing
def _where(path: str, source: str) -> str:
    return f"'{path}' in {source}"


def _options(ann) -> list:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return list(typing.get_args(ann))
    return [ann]


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxlevel = 60, 60, 4, 4, 4, 2


def short_repr(value: Any, limit: int = 120) -> str:
    """A value for an error message: never the whole of a big (or alias-expanded) value."""
    if isinstance(value, FrozenMap):
        value = dict(value._items[:5])
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar_ok(value: Any, opts: list) -> bool:
    if isinstance(value, bool):
        return bool in opts
    if isinstance(value, int):
        return int in opts or float in opts
    if isinstance(value, float):
        return float in opts
    if isinstance(value, str):
        return str in opts
    return False


# Range rules by field name (visdet's modules assert or silently misbehave outside them).
_POSITIVE = {"num_classes", "num_outs", "num_stages", "depth", "depths", "groups", "base_width", "embed_dims",
             "patch_size", "window_size", "num_heads", "pad_size_divisor", "roi_feat_size", "num_prototypes",
             "conv_kernel_size", "pred_kernel_size", "mask_size", "max_per_img", "mask_loss_stride", "topk",
             "strides", "featmap_strides", "dilations", "spp_kernel_sizes", "finest_scale", "num"}
_NON_NEGATIVE = {"num_convs", "num_shared_convs", "num_shared_fcs", "num_cls_convs", "num_cls_fcs", "num_reg_convs",
                 "num_reg_fcs", "num_csp_blocks", "num_dyconvs", "stacked_convs", "sampling_ratio", "start_level"}
_POSITIVE_FLOAT = {"widen_factor", "deepen_factor", "mlp_ratio", "expand_ratio", "eps"}


def _check_range(name: str, value: Any, path: str, source: str) -> None:
    positive = name in _POSITIVE or name.endswith("channels")
    if not (positive or name in _NON_NEGATIVE or name in _POSITIVE_FLOAT) or value is None:
        return
    items = value if isinstance(value, tuple) else (value,)
    for i, v in enumerate(items):
        where = _where(f"{path}.{i}" if isinstance(value, tuple) else path, source)
        if name in _POSITIVE_FLOAT:
            if not isinstance(v, int | float) or isinstance(v, bool) or not v > 0:
                raise ConfigError(f"{where} must be a positive number, got {short_repr(v)}")
        elif not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(f"{where} must be an integer, got {short_repr(v)}")
        elif v < 1 if positive else v < 0:
            raise ConfigError(f"{where} must be {'>= 1' if positive else '>= 0'}, got {v}")


def _convert(value: Any, ann: Any, path: str, source: str) -> Any:
    opts = _options(ann)
    if value is None:
        if type(None) in opts:
            return None
        raise ConfigError(f"{_where(path, source)} must not be null")
    scalar_opts = [o for o in opts if o is not type(None)]
    if scalar_opts and all(o in _SCALAR_NAMES for o in scalar_opts) and not _scalar_ok(value, opts):
        want = " or ".join(_SCALAR_NAMES[o] for o in scalar_opts if not (o is int and float in scalar_opts))
        raise ConfigError(f"{_where(path, source)} must be {want}, got {short_repr(value)} "
                          f"({type(value).__name__})")
    cfg_opts = [o for o in opts if isinstance(o, type) and issubclass(o, Cfg)]
    if isinstance(value, Mapping) and cfg_opts:
        return _parse_cfg(value, cfg_opts[0], path, source)
    if isinstance(value, list | tuple):
        tuple_opts = [o for o in opts if typing.get_origin(o) is tuple or o is tuple]
        for o in tuple_opts:
            args = [a for a in typing.get_args(o) if a is not Ellipsis]
            if args and isinstance(args[0], type) and issubclass(args[0], Cfg):
                return tuple(_parse_cfg(v, args[0], f"{path}.{i}", source)
                             for i, v in enumerate(value))
            return _freeze(value)
        if Any in opts or ann is Any:
            return _freeze(value)
        raise ConfigError(f"{_where(path, source)} must not be a list (got {short_repr(value)})")
    if isinstance(value, Mapping):
        if FrozenMap in opts or Any in opts:
            return FrozenMap(value)
        raise ConfigError(f"{_where(path, source)} must not be a mapping (got {short_repr(dict(value))})")
    if float in opts and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _parse_cfg(d: Mapping, expected: type[Cfg], path: str, source: str) -> Cfg:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{_where(path, source)} must be a mapping, got {type(d).__name__}")
    cls = expected
    base = next((b for b in expected.__mro__ if b in _TYPED_BASES), None)
    if base is not None:  # a module config: ``type`` picks the dataclass from the table
        if "type" in d:
            tname = d["type"]
            if not isinstance(tname, str) or tname not in TYPE_TABLE:
                raise ConfigError(
                    f"unknown type {short_repr(tname)} at {_where(path + '.type', source)}; "
                    f"supported: {sorted(TYPE_TABLE)}")
            cls = TYPE_TABLE[tname]
            if not issubclass(cls, base):
                raise ConfigError(f"type '{tname}' is not allowed at {_where(path, source)} "
                                  f"(expects a {base.__name__.removesuffix('Cfg')})")
        elif expected.TYPE is None:
            allowed = [k for k, v in TYPE_TABLE.items() if issubclass(v, base)]
            raise ConfigError(f"{_where(path or '<top>', source)} needs a 'type' key (one of {allowed})")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key == "type" and base is not None:
            continue
        if key not in names:
            raise ConfigError(f"unknown key {_where(f'{path}.{key}' if path else key, source)} "
                              f"for {cls.TYPE or cls.__name__}; known keys: {sorted(names)}")
        kwargs[key] = _convert(value, hints[key], f"{path}.{key}" if path else key, source)
        _check_range(key, kwargs[key], f"{path}.{key}" if path else key, source)
    cfg = cls(**kwargs)
    _check_honoured(cfg, path, source)
    return cfg


_TYPED_BASES = (BackboneCfg, NeckCfg, DenseHeadCfg, RoIHeadCfg, BBoxHeadCfg, MaskHeadCfg,
                RoIExtractorCfg, RoILayerCfg, PriorGeneratorCfg, BBoxCoderCfg, LossCfg,
                AssignerCfg, SamplerCfg, DetectorCfg, PreprocessorCfg)


def parse_model_config(d: Mapping, source: str = "<dict>") -> DetectorCfg:
    """Parse a visdet model dict (with ``type: MaskRCNN`` / ``RTMDet`` ...) into dataclasses.

    visdet's ``TwoStageDetector`` forces ``rpn_head.num_classes = 1`` and hands
    ``train_cfg.rpn``/``test_cfg.rpn`` to the RPN head and ``*.rcnn`` to the RoI
    head; we do the same here so each module config is complete on its own.
    """
    if "model" in d and "type" not in d:
        d = d["model"]
    cfg = _parse_cfg(d, DetectorCfg, "", source)
    if getattr(cfg, "rpn_head", None) is not None:
        cfg = dataclasses.replace(cfg, rpn_head=dataclasses.replace(
            cfg.rpn_head, num_classes=1,
            train_cfg=cfg.train_cfg.rpn if cfg.train_cfg else cfg.rpn_head.train_cfg,
            test_cfg=cfg.test_cfg.rpn if cfg.test_cfg else cfg.rpn_head.test_cfg))
    if getattr(cfg, "roi_head", None) is not None:
        cfg = dataclasses.replace(cfg, roi_head=dataclasses.replace(
            cfg.roi_head,
            train_cfg=cfg.train_cfg.rcnn if cfg.train_cfg else cfg.roi_head.train_cfg,
            test_cfg=cfg.test_cfg.rcnn if cfg.test_cfg else cfg.roi_head.test_cfg))
    if isinstance(cfg, RTMDetCfg) and cfg.bbox_head is not None:  # visdet's SingleStageDetector does the same
        cfg = dataclasses.replace(cfg, bbox_head=dataclasses.replace(
            cfg.bbox_head, train_cfg=cfg.train_cfg or cfg.bbox_head.train_cfg,
            test_cfg=cfg.test_cfg or cfg.bbox_head.test_cfg))
    return cfg


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A preset name (``mask_rcnn_r50``) or a path to a visdet YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(f"'{name_or_path}' is neither a config file nor a preset; "
                      f"presets: {list_presets()}")


def _deep_merge(base: Mapping, child: Mapping) -> dict:
    """visdet's YAML loader: dicts merge key by key, the child wins, anything else (lists too) is replaced whole."""
    out = dict(base)
    for k, v in child.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


# A config file is small; more YAML nodes than this once aliases (``*a``) are expanded is an alias bomb (a 1 KB file
# of nested anchors expands to billions of nodes: every consumer would walk or print all of them).
MAX_YAML_NODES = 100_000
MAX_CONFIG_BYTES = 16 << 20


def _expanded_nodes(root, budget: int, path) -> int:
    """The node count of ``root`` with every alias expanded, stopping at ``budget``; a cycle is an error."""
    sizes: dict = {}
    active: set = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError(f"{path}: a YAML alias refers to itself (a recursive structure); configs are trees")
        active.add(key)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [c for kv in node.value for c in kv]
        else:
            children = ()
        for child in children:
            n += size(child)
            if n > budget:
                raise ConfigError(f"{path}: YAML aliases expand to more than {budget} nodes (an alias bomb?); "
                                  "write the values out or use fewer nested anchors")
        active.discard(key)
        sizes[key] = n
        return n

    return size(root)


def safe_load_yaml(raw: bytes, path="<config>", max_nodes: int = MAX_YAML_NODES):
    """``yaml.safe_load`` with caps before allocation: text only, at most ``MAX_CONFIG_BYTES``, aliases expanding
    to at most ``max_nodes`` nodes, no recursive aliases, bounded nesting. Errors are one ConfigError line."""
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes is too big for a model config (limit {MAX_CONFIG_BYTES})")
    if b"\0" in raw:
        raise ConfigError(f"{path}: a binary file, not a YAML config; pass a visdet YAML model file or a preset name")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}); pass a visdet YAML model file or a "
                          "preset name") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_nodes(node, max_nodes, path)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML: {msg[:300]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml_with_bases(path: Path, _chain: tuple = ()) -> dict:
    """A YAML mapping with its ``_base_:`` files (one path or a list, relative to the file) merged under it,
    depth-first, as visdet's ``Config.fromfile`` does. A chain that loops or names a missing file is an error
    naming the chain."""
    path = Path(path)
    key = path.resolve()
    if key in _chain:
        loop = " -> ".join(str(p) for p in (*_chain[_chain.index(key):], key))
        raise ConfigError(f"{path}: _base_ chain loops: {loop}")
    try:
        data = safe_load_yaml(path.read_bytes(), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at top level, got {type(data).__name__}")
    bases = data.get("_base_")
    if bases is None:
        return dict(data)
    data = {k: v for k, v in data.items() if k != "_base_"}
    merged: dict = {}
    for b in [bases] if isinstance(bases, str) else list(bases) if isinstance(bases, list) else [None]:
        if not isinstance(b, str):
            raise ConfigError(f"{path}: _base_ must be a file path or a list of them, got {short_repr(bases)}")
        bp = (path.parent / b)
        if not bp.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {b} (looked for {bp})")
        merged = _deep_merge(merged, read_yaml_with_bases(bp, (*_chain, key)))
    return _deep_merge(merged, data)


def load_config(name_or_path: str | Path, **overrides) -> TwoStageDetectorCfg:
    """Read a visdet YAML model config (or a preset name) once into dataclasses."""
    path = resolve_config_path(name_or_path)
    cfg = parse_model_config(read_yaml_with_bases(path), str(path))
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


# ---------------------------------------------------------------------------- writing
def to_dict(cfg: Any) -> Any:
    """A config back in visdet's schema: plain dicts/lists with ``type`` keys."""
    if isinstance(cfg, Cfg):
        out = {"type": cfg.TYPE} if cfg.TYPE else {}
        for f in dataclasses.fields(cfg):
            out[f.name] = to_dict(getattr(cfg, f.name))
        return out
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, tuple | list):
        return [to_dict(v) for v in cfg]
    return cfg


def dump_yaml(cfg: Cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
