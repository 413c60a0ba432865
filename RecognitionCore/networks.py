"""Network definitions the modules train and run: a 3D RetinaNet nodule detector with a per-box mask branch, MONAI
segmentation networks, and the backbone handling that transfer learning needs (stages, freezing, learning rates).

The detector is MONAI's ``apps.detection`` RetinaNet (ResNet + FPN + anchor heads, ATSS matching, hard negative
sampling, box coder, NMS) assembled without torchvision: MONAI's ``BackboneWithFPN`` needs torchvision's
``IntermediateLayerGetter``, which is replaced here by :class:`ResNetLayers`. The module names are the same, so the
``state_dict`` of ``NoduleDetector.build("zoo")`` has exactly the keys of the RetinaNet that the model zoo's
``lung_nodule_ct_detection`` bundle saves in ``models/model.pt`` and loads with ``strict=True``.

Array conventions follow MONAI and :mod:`.predict`: images are channel-first ``(C, I, J, K)`` arrays (batched
``(B, C, I, J, K)``), boxes are ``xyzxyz`` corner coordinates in voxel units of that array, where voxel ``i`` spans
``[i, i + 1)`` (``monai.data.box_utils`` StandardMode).
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.losses import DiceLoss
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import SegResNet, UNet, resnet
from monai.networks.layers.simplelayers import SkipConnection

from .errors import InputError, ModelError

DETECTOR_ARCHITECTURE_NAME = "RecognitionCore.networks.NoduleDetector"

# Every field NoduleDetector accepts. "zoo" is the lung_nodule_ct_detection bundle (configs/train.json: resnet50,
# returned_layers [1, 2], 256 FPN channels, 3 anchor shapes at scales 1/2/4, box selector 0.02/1000/0.22/300);
# "tiny" is for tests, "small" the shipped default (weights of a few MB).
DETECTOR_CONFIGS: Dict[str, Dict[str, Any]] = {
    "zoo": dict(block="bottleneck", layers=[3, 4, 6, 3], block_inplanes=[64, 128, 256, 512], conv1_t_size=[7, 7, 7],
                conv1_t_stride=[2, 2, 1], returned_layers=[1, 2], fpn_channels=256, num_classes=1,
                feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]],
                score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_image=300,
                mask_head=False, mask_size=24, mask_channels=16, mask_context=1.25),
    "small": dict(block="basic", layers=[1, 2, 1, 1], block_inplanes=[16, 32, 64, 128], conv1_t_size=[7, 7, 5],
                  conv1_t_stride=[2, 2, 1], returned_layers=[1, 2], fpn_channels=32, num_classes=1,
                  feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]],
                  score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_image=100,
                  mask_head=True, mask_size=24, mask_channels=16, mask_context=1.25),
    "tiny": dict(block="basic", layers=[1, 1, 1, 1], block_inplanes=[8, 16, 16, 16], conv1_t_size=[3, 3, 3],
                 conv1_t_stride=[2, 2, 1], returned_layers=[1, 2], fpn_channels=16, num_classes=1,
                 feature_map_scales=[1, 2, 4], base_anchor_shapes=[[6, 8, 4], [8, 6, 5], [10, 10, 6]],
                 score_thresh=0.02, topk_candidates_per_level=100, nms_thresh=0.22, detections_per_image=20,
                 mask_head=True, mask_size=16, mask_channels=8, mask_context=1.25),
}

_BLOCKS = {"basic": resnet.ResNetBlock, "bottleneck": resnet.ResNetBottleneck}

SEGMENTER_CONFIGS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "unet": {
        "tiny": dict(channels=[4, 8, 16], strides=[2, 2], num_res_units=1),
        "small": dict(channels=[16, 32, 64, 128], strides=[2, 2, 2], num_res_units=2),
    },
    "segresnet": {
        "tiny": dict(init_filters=8, blocks_down=[1, 1, 1], blocks_up=[1, 1]),
        "small": dict(init_filters=8, blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1]),
    },
}
_SEGMENTER_CLASSES = {"unet": "monai.networks.nets.UNet", "segresnet": "monai.networks.nets.SegResNet"}


# --- detector -------------------------------------------------------------------------------------------------------

class ResNetLayers(nn.ModuleDict):
    """The backbone's children up to the last returned layer; ``forward`` returns those layers' outputs by name.

    Stands in for torchvision's ``IntermediateLayerGetter`` (used by MONAI's ``BackboneWithFPN``): same children,
    same names, so the same ``state_dict`` keys (``body.conv1.weight``, ``body.layer1.0.bn1.running_mean``, ...).
    """

    def __init__(self, backbone: nn.Module, return_layers: Dict[str, str]) -> None:
        children = [name for name, _ in backbone.named_children()]
        missing = [name for name in return_layers if name not in children]
        if missing:
            raise ModelError(f"Backbone {type(backbone).__name__} has no layers {missing}")
        last = max(children.index(name) for name in return_layers)
        super().__init__(OrderedDict((name, module) for name, module in list(backbone.named_children())[:last + 1]))
        self.return_layers = dict(return_layers)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        outputs: Dict[str, torch.Tensor] = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                outputs[self.return_layers[name]] = x
        return outputs


class ResNetFPNFeatureExtractor(nn.Module):
    """``body`` (ResNet layers) + ``fpn``, as MONAI's ``BackboneWithFPN`` built by ``resnet_fpn_feature_extractor``.

    Outputs the FPN maps of the returned layers plus a max-pooled coarser level, finest first.
    """

    def __init__(self, backbone: resnet.ResNet, returned_layers: Sequence[int], out_channels: int,
                 spatial_dims: int = 3) -> None:
        super().__init__()
        return_layers = {f"layer{k}": str(index) for index, k in enumerate(returned_layers)}
        self.body = ResNetLayers(backbone, return_layers)
        in_channels_list = [_output_channels(getattr(backbone, f"layer{k}")) for k in returned_layers]
        self.fpn = FeaturePyramidNetwork(spatial_dims=spatial_dims, in_channels_list=in_channels_list,
                                         out_channels=out_channels, extra_blocks=LastLevelMaxPool(spatial_dims))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def _output_channels(layer: nn.Sequential) -> int:
    """Channels a ResNet layer produces: those of its last convolution."""
    return [m for m in layer.modules() if isinstance(m, nn.Conv3d)][-1].out_channels


class BoxMaskHead(nn.Module):
    """Per-box binary mask predictor, in the spirit of Mask R-CNN's mask branch.

    Each box (enlarged by ``context`` around its centre) is resampled from the input image into a ``size``^3 crop
    (trilinear, RoIAlign-like); dilated 3D convolutions predict one mask logit per crop voxel. Cropping the input
    rather than the FPN keeps the full resolution that small nodules need.
    """

    def __init__(self, in_channels: int = 1, channels: int = 16, size: int = 24, context: float = 1.25) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        previous = in_channels
        for dilation in (1, 2, 4, 1):
            layers += [nn.Conv3d(previous, channels, 3, padding=dilation, dilation=dilation),
                       nn.InstanceNorm3d(channels, affine=True), nn.ReLU(inplace=True)]
            previous = channels
        layers.append(nn.Conv3d(channels, 1, 1))
        self.layers = nn.Sequential(*layers)
        self.size = int(size)
        self.context = float(context)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.layers(crops)

    def crop_regions(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 6) boxes -> (N, 6) crop regions: same centre, sides x ``context`` (at least one voxel)."""
        centre = (boxes[:, :3] + boxes[:, 3:]) / 2
        half = torch.clamp((boxes[:, 3:] - boxes[:, :3]) * self.context, min=1.0) / 2
        return torch.cat([centre - half, centre + half], dim=1)

    def sample(self, volume: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """Resample each region of a (C, I, J, K) volume to (N, C, size, size, size)."""
        steps = (torch.arange(self.size, dtype=volume.dtype, device=volume.device) + 0.5) / self.size
        grid = _region_grid(regions.to(volume.dtype), (steps, steps, steps), volume.shape[1:])
        batch = volume.unsqueeze(0).expand(len(regions), *volume.shape)
        return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _region_grid(regions: torch.Tensor, fractions: Sequence[torch.Tensor], shape: Sequence[int]) -> torch.Tensor:
    """``grid_sample`` grid (N, a, b, c, 3) for points at ``fractions`` of each region, in a volume of ``shape``.

    Voxel i spans [i, i + 1), so continuous coordinate p maps to 2 p / size - 1 (``align_corners=False``); the grid's
    last axis is ordered (K, J, I) as grid_sample expects.
    """
    axes = []
    for axis in range(3):
        start, end = regions[:, axis], regions[:, axis + 3]
        coords = start[:, None] + fractions[axis][None, :] * (end - start)[:, None]
        axes.append(2 * coords / shape[axis] - 1)
    n = len(regions)
    i = axes[0][:, :, None, None].expand(n, len(fractions[0]), len(fractions[1]), len(fractions[2]))
    j = axes[1][:, None, :, None].expand_as(i)
    k = axes[2][:, None, None, :].expand_as(i)
    return torch.stack([k, j, i], dim=-1)


def _soft_dice_bce(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return DiceLoss(sigmoid=True, batch=False)(logits, truth) + F.binary_cross_entropy_with_logits(logits, truth)


class ATSSRetinaNetDetector(RetinaNetDetector):
    """MONAI's ``RetinaNetDetector`` with anchor matching by its ATSS matcher only.

    The base class first tests ``isinstance(matcher, torchvision Matcher)``, which raises ``OptionalImportError``
    when torchvision is absent; this override goes straight to the ATSS branch of the same method.
    """

    def compute_anchor_matched_idxs(self, anchors: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]],
                                    num_anchor_locs_per_level: Sequence[int]) -> List[torch.Tensor]:
        matched = []
        for anchors_per_image, target in zip(anchors, targets):
            boxes = target[self.target_box_key].to(anchors_per_image.device)
            if boxes.numel() == 0:
                matched.append(torch.full((anchors_per_image.size(0),), -1, dtype=torch.int64,
                                          device=anchors_per_image.device))
                continue
            _, indices = self.proposal_matcher(boxes, anchors_per_image, num_anchor_locs_per_level,
                                               self.num_anchors_per_loc)
            matched.append(indices)
        return matched


class NoduleDetector(RetinaNet):
    """3D RetinaNet nodule detector (MONAI ``apps.detection``) with an optional per-box mask branch.

    The module *is* MONAI's ``RetinaNet`` (``feature_extractor``, ``classification_head``, ``regression_head``),
    plus ``mask_head`` when ``mask_head=True``; detection logic (anchors, ATSS matcher, hard negative sampler, losses,
    box selection with NMS) is MONAI's ``RetinaNetDetector`` (:class:`ATSSRetinaNetDetector`), held as ``detector``,
    which has no weights.

    ``NoduleDetector(config="small", **overrides)``: a preset of :data:`DETECTOR_CONFIGS` with any field replaced.
    ``forward(images, targets)``: training mode -> dict of scalar losses (``classification``, ``box_regression``, and
    ``mask`` when targets carry ``masks``); eval mode -> one dict per image with ``boxes`` (N, 6) xyzxyz voxel
    coordinates of the input array, ``scores``, ``labels`` and, with a mask head, ``masks`` (list of boolean arrays
    over each box's voxel extent) and ``mask_origins`` (N, 3) (first voxel of each mask; see :func:`paste_masks`).
    """

    def __init__(self, config: str = "small", **overrides: Any) -> None:
        if config not in DETECTOR_CONFIGS:
            raise InputError(f"Unknown detector config {config!r}; known: {', '.join(DETECTOR_CONFIGS)}")
        unknown = sorted(set(overrides) - set(DETECTOR_CONFIGS[config]))
        if unknown:
            raise InputError(f"Unknown detector settings {unknown}; known: {', '.join(DETECTOR_CONFIGS[config])}")
        settings = copy.deepcopy(DETECTOR_CONFIGS[config])
        settings.update(copy.deepcopy(overrides))
        if settings["block"] not in _BLOCKS:
            raise InputError(f"Unknown ResNet block {settings['block']!r}; known: {', '.join(_BLOCKS)}")
        backbone = resnet.ResNet(block=_BLOCKS[settings["block"]], layers=list(settings["layers"]),
                                 block_inplanes=list(settings["block_inplanes"]), spatial_dims=3, n_input_channels=1,
                                 conv1_t_size=tuple(settings["conv1_t_size"]),
                                 conv1_t_stride=tuple(settings["conv1_t_stride"]))
        feature_extractor = ResNetFPNFeatureExtractor(backbone, settings["returned_layers"], settings["fpn_channels"])
        anchor_generator = AnchorGeneratorWithAnchorShape(
            feature_map_scales=list(settings["feature_map_scales"]),
            base_anchor_shapes=[tuple(shape) for shape in settings["base_anchor_shapes"]])
        size_divisible = [2 * stride * 2 ** max(settings["returned_layers"]) for stride in settings["conv1_t_stride"]]
        super().__init__(spatial_dims=3, num_classes=settings["num_classes"],
                         num_anchors=anchor_generator.num_anchors_per_location()[0],
                         feature_extractor=feature_extractor, size_divisible=size_divisible)
        self.config_name = config
        self.config = settings
        if settings["mask_head"]:
            self.mask_head = BoxMaskHead(1, settings["mask_channels"], settings["mask_size"], settings["mask_context"])
        self.detector = ATSSRetinaNetDetector(network=_HeadOutputs(self), anchor_generator=anchor_generator)
        # Training setup of the zoo bundle (configs/train.json "detector_ops").
        self.detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
        self.detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20,
                                                min_neg=16)
        self.detector.set_box_selector_parameters(
            score_thresh=settings["score_thresh"], topk_candidates_per_level=settings["topk_candidates_per_level"],
            nms_thresh=settings["nms_thresh"], detections_per_img=settings["detections_per_image"])

    @classmethod
    def build(cls, config: Union[str, Dict[str, Any]] = "small") -> "NoduleDetector":
        """A preset name, or a dict of settings (``{"config": preset, **overrides}``, e.g. an architecture's args)."""
        if isinstance(config, str):
            return cls(config)
        settings = dict(config)
        return cls(settings.pop("config", "small"), **settings)

    def architecture(self) -> Dict[str, Any]:
        """Model card ``architecture``: ``models.build_architecture`` rebuilds this network from it."""
        return {"name": DETECTOR_ARCHITECTURE_NAME, "args": {"config": self.config_name, **copy.deepcopy(self.config)}}

    def head_outputs(self, images: torch.Tensor) -> Dict[str, List[torch.Tensor]]:
        """MONAI RetinaNet forward: classification and box-regression maps per FPN level."""
        return RetinaNet.forward(self, images)

    def set_sliding_window(self, roi_size: Sequence[int], overlap: float = 0.25, sw_batch_size: int = 1,
                           device: Optional[str] = None) -> None:
        """Sliding-window inference for ``forward(..., use_inferer=True)`` (roi multiple of ``size_divisible``)."""
        self.detector.set_sliding_window_inferer(roi_size=list(roi_size), overlap=overlap,
                                                 sw_batch_size=sw_batch_size, mode="constant", device=device)

    def forward(self, images: Union[torch.Tensor, List[torch.Tensor]],
                targets: Optional[List[Dict[str, torch.Tensor]]] = None, use_inferer: bool = False,
                masks: bool = True):
        if self.training:
            if targets is None:
                raise InputError("NoduleDetector in training mode needs targets (a dict with boxes and labels "
                                 "per image)")
            losses = self.detector(images, targets)
            if hasattr(self, "mask_head") and any("masks" in target for target in targets):
                losses["mask"] = self.mask_loss(images, targets)
            return losses
        with torch.no_grad():
            detections = self.detector(images, use_inferer=use_inferer)
        results = []
        for index, detection in enumerate(detections):
            result = {"boxes": detection[self.detector.target_box_key],
                      "scores": detection[self.detector.pred_score_key],
                      "labels": detection[self.detector.target_label_key]}
            if hasattr(self, "mask_head") and masks:  # masks=False: boxes only (e.g. for scoring candidates)
                result["masks"], result["mask_origins"] = self.predict_masks(images[index], result["boxes"])
            results.append(result)
        return results

    def mask_loss(self, images, targets: List[Dict[str, torch.Tensor]]) -> torch.Tensor:
        """Dice + BCE of the mask head on the truth boxes (jittered by up to 10% of their size) of every image."""
        crops, truths = [], []
        for image, target in zip(images, targets):
            boxes = target["boxes"].to(image.dtype)
            if "masks" not in target or len(boxes) == 0:
                continue
            truth = target["masks"].to(image.dtype).reshape(1, *image.shape[1:])
            jitter = (torch.rand_like(boxes) - 0.5) * 0.2 * (boxes[:, 3:] - boxes[:, :3]).repeat(1, 2)
            regions = self.mask_head.crop_regions(boxes + jitter)
            crops.append(self.mask_head.sample(image, regions))
            truths.append((self.mask_head.sample(truth, regions) > 0.5).to(image.dtype))
        if not crops:
            return images[0].sum() * 0
        return _soft_dice_bce(self.mask_head(torch.cat(crops)), torch.cat(truths))

    @torch.no_grad()
    def predict_masks(self, image: torch.Tensor, boxes: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """Masks of ``boxes`` in one (C, I, J, K) image, pasted back over each box's voxel extent."""
        shape = torch.tensor(image.shape[1:], device=boxes.device)
        origins = torch.clamp(torch.floor(boxes[:, :3]), min=0).long()
        ends = torch.minimum(torch.ceil(boxes[:, 3:]).long(), shape)
        if len(boxes) == 0:
            return [], origins
        regions = self.mask_head.crop_regions(boxes.to(image.dtype))
        probabilities = torch.sigmoid(self.mask_head(self.mask_head.sample(image, regions)))
        masks = []
        for index in range(len(boxes)):
            extent = (ends[index] - origins[index]).clamp(min=1)
            region = regions[index:index + 1]
            # Voxel centres of the box extent, as fractions of the crop region.
            fractions = [(origins[index, axis] + 0.5 + torch.arange(int(extent[axis]), dtype=image.dtype,
                                                                      device=image.device) - region[0, axis])
                         / (region[0, axis + 3] - region[0, axis]) for axis in range(3)]
            unit = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]], dtype=image.dtype, device=image.device)
            grid = _region_grid(unit, fractions, [1, 1, 1])
            pasted = F.grid_sample(probabilities[index:index + 1], grid, mode="bilinear", align_corners=False)
            masks.append(pasted[0, 0] > 0.5)
        return masks, origins


class _HeadOutputs:
    """What ``RetinaNetDetector`` calls as its network: MONAI's RetinaNet forward of the owning NoduleDetector.

    A plain object, not a Module, so that the detector does not register the network's weights a second time.
    """

    def __init__(self, owner: NoduleDetector) -> None:
        self._owner = owner

    def __getattr__(self, name: str):
        if name.startswith("_"):  # copy/pickle probes, and _owner before __init__ ran
            raise AttributeError(name)
        return getattr(self._owner, name)

    def __call__(self, images: torch.Tensor):
        return self._owner.head_outputs(images)


def paste_masks(masks: Sequence[torch.Tensor], origins: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Label array of ``shape``: mask k (from ``NoduleDetector`` results) written as k + 1, earlier masks on top."""
    labels = torch.zeros(tuple(shape), dtype=torch.int32)
    for index in range(len(masks) - 1, -1, -1):
        start = [int(v) for v in origins[index]]
        window = tuple(slice(s, s + n) for s, n in zip(start, masks[index].shape))
        labels[window][masks[index].cpu()] = index + 1
    return labels


def detector_architecture(config: str = "small", **overrides: Any) -> Dict[str, Any]:
    """Model card ``architecture`` of a detector preset, without building it."""
    if config not in DETECTOR_CONFIGS:
        raise InputError(f"Unknown detector config {config!r}; known: {', '.join(DETECTOR_CONFIGS)}")
    settings = copy.deepcopy(DETECTOR_CONFIGS[config])
    settings.update(copy.deepcopy(overrides))
    return {"name": DETECTOR_ARCHITECTURE_NAME, "args": {"config": config, **settings}}


# --- segmentation ---------------------------------------------------------------------------------------------------

def segmenter_architecture(name: str = "unet", in_channels: int = 1, out_channels: int = 2,
                           size: str = "small") -> Dict[str, Any]:
    """Model card ``architecture`` ``{"name": "monai.networks.nets.UNet", "args": {...}}`` of a segmenter preset."""
    if name not in SEGMENTER_CONFIGS:
        raise InputError(f"Unknown segmenter {name!r}; known: {', '.join(SEGMENTER_CONFIGS)}")
    if size not in SEGMENTER_CONFIGS[name]:
        raise InputError(f"Unknown segmenter size {size!r}; known: {', '.join(SEGMENTER_CONFIGS[name])}")
    if int(in_channels) < 1 or int(out_channels) < 1:
        raise InputError(f"Segmenter channels must be >= 1, got in_channels={in_channels}, "
                         f"out_channels={out_channels}")
    args = {"spatial_dims": 3, "in_channels": int(in_channels), "out_channels": int(out_channels),
            **copy.deepcopy(SEGMENTER_CONFIGS[name][size])}
    return {"name": _SEGMENTER_CLASSES[name], "args": args}


def build_segmenter(name: str = "unet", in_channels: int = 1, out_channels: int = 2, size: str = "small") -> nn.Module:
    """MONAI UNet or SegResNet of a preset size; ``segmenter_architecture`` gives the matching card description."""
    args = segmenter_architecture(name, in_channels, out_channels, size)["args"]
    return (UNet if name == "unet" else SegResNet)(**args)


# --- transfer learning ----------------------------------------------------------------------------------------------

def backbone_stages(network: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Encoder stages from input to bottleneck: ``[("stem", ...), ("stage1", ...), ...]``.

    Detector / ResNet: stem = conv1 + bn1, stage k = layer k (those present). UNet: each down block, then the
    bottom block. SegResNet: stem = convInit, stage k = down_layers[k - 1].
    """
    if isinstance(network, NoduleDetector) or hasattr(network, "feature_extractor"):
        return _resnet_stages(network.feature_extractor.body)
    if isinstance(network, resnet.ResNet):
        return _resnet_stages(network)
    if isinstance(network, UNet):
        levels, node = [], network.model
        while isinstance(node, nn.Sequential) and len(node) == 3 and isinstance(node[1], SkipConnection):
            levels.append(node[0])
            node = node[1].submodule
        levels.append(node)
        return _named_stages(levels)
    if isinstance(network, SegResNet):
        return _named_stages([network.convInit, *network.down_layers])
    raise InputError(f"No known backbone stages in a {type(network).__name__} (expected NoduleDetector, RetinaNet, "
                     f"ResNet, UNet or SegResNet)")


def _resnet_stages(body: nn.Module) -> List[Tuple[str, nn.Module]]:
    stem = nn.ModuleDict(OrderedDict((name, getattr(body, name)) for name in ("conv1", "bn1")))
    layers = [getattr(body, f"layer{k}") for k in range(1, 5) if hasattr(body, f"layer{k}")]
    return _named_stages([stem, *layers])


def _named_stages(modules: Sequence[nn.Module]) -> List[Tuple[str, nn.Module]]:
    return [("stem" if index == 0 else f"stage{index}", module) for index, module in enumerate(modules)]


def _parameter_names(network: nn.Module, modules: Sequence[nn.Module]) -> List[str]:
    owned = {id(p) for module in modules for p in module.parameters()}
    return [name for name, p in network.named_parameters() if id(p) in owned]


def _keep_batchnorm_in_eval(module: nn.Module, inputs) -> None:
    """Forward pre-hook of frozen BatchNorm layers: use, never update, the running statistics."""
    module.training = False


def freeze_stages(network: nn.Module, count: int) -> List[str]:
    """Freeze the first ``count`` backbone stages; returns the names of the parameters frozen.

    Parameters get ``requires_grad=False``. BatchNorm layers in those stages are switched to eval mode and keep it
    across later ``network.train()`` calls (a forward pre-hook), so their running mean/variance stay as trained;
    :func:`unfreeze_stages` undoes both.
    """
    stages = backbone_stages(network)
    if not 0 <= int(count) <= len(stages):
        raise InputError(f"Cannot freeze {count} stages: the network has {len(stages)} "
                         f"({', '.join(name for name, _ in stages)})")
    modules = [module for _, module in stages[:int(count)]]
    for module in modules:
        module.requires_grad_(False)
        for layer in module.modules():
            if isinstance(layer, nn.modules.batchnorm._BatchNorm) and not hasattr(layer, "_frozen_hook"):
                layer.eval()
                layer._frozen_hook = layer.register_forward_pre_hook(_keep_batchnorm_in_eval)
    return _parameter_names(network, modules)


def unfreeze_stages(network: nn.Module) -> List[str]:
    """Make every backbone stage trainable again (BatchNorm follows ``train()``/``eval()``); returns the names."""
    modules = [module for _, module in backbone_stages(network)]
    for module in modules:
        module.requires_grad_(True)
        for layer in module.modules():
            if hasattr(layer, "_frozen_hook"):
                layer._frozen_hook.remove()
                del layer._frozen_hook
                layer.train(network.training)
    return _parameter_names(network, modules)


def parameter_groups(network: nn.Module, backbone_lr: float, head_lr: float) -> List[Dict[str, Any]]:
    """Optimizer groups: trainable backbone-stage parameters at ``backbone_lr``, all other trainable at ``head_lr``."""
    if backbone_lr < 0 or head_lr < 0 or math.isnan(backbone_lr) or math.isnan(head_lr):
        raise InputError(f"Learning rates must be >= 0, got backbone_lr={backbone_lr}, head_lr={head_lr}")
    backbone = {id(p) for _, module in backbone_stages(network) for p in module.parameters()}
    groups = [{"name": "backbone", "params": [], "lr": float(backbone_lr)},
              {"name": "head", "params": [], "lr": float(head_lr)}]
    for p in network.parameters():
        if p.requires_grad:
            groups[0 if id(p) in backbone else 1]["params"].append(p)
    return [group for group in groups if group["params"]]


def parameter_count(network: nn.Module) -> int:
    """Number of weights (trainable or frozen), for model cards and reports."""
    return sum(p.numel() for p in network.parameters())
