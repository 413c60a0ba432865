"""Tests of RecognitionCore.networks: detector training/inference, zoo key compatibility, mask branch, segmenters,
backbone stages, freezing and learning-rate groups. Tiny configs on small synthetic volumes, CPU, seeded."""

import numpy as np
import torch

from RecognitionCore import networks
from RecognitionCore.errors import InputError
from RecognitionCore.models import build_architecture
from RecognitionCore.testing import assert_raises

# (centre, radii) in voxels: nodules on a grid with thicker slices along K, sized like the zoo's anchor shapes.
SPHERES = [((14.0, 16.0, 8.0), (5.0, 5.0, 3.0)), ((34.0, 30.0, 15.0), (4.0, 4.0, 2.5))]


def _sphere_case(shape=(48, 48, 24), spheres=SPHERES, seed=0):
    """(1, I, J, K) image in [0, 1] with bright noisy spheres (ellipsoids in voxels), their boxes (xyzxyz), mask."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) + 0.5 for n in shape], indexing="ij"), axis=-1)
    mask = np.zeros(shape, bool)
    boxes = []
    for centre, radii in spheres:
        mask |= np.linalg.norm((grid - np.array(centre)) / np.array(radii), axis=-1) <= 1.0
        boxes.append([c - r for c, r in zip(centre, radii)] + [c + r for c, r in zip(centre, radii)])
    image = 0.7 * mask + rng.normal(0, 0.05, shape)
    return (torch.tensor(image[None], dtype=torch.float32), torch.tensor(boxes, dtype=torch.float32),
            torch.tensor(mask))


def _dice(a, b):
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_detector_losses_fall_and_inference_finds_spheres():
    torch.manual_seed(0)
    image, boxes, mask = _sphere_case()
    detector = networks.NoduleDetector.build("tiny")
    targets = [{"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long), "masks": mask}]
    optimizer = torch.optim.Adam(detector.parameters(), lr=3e-3)
    detector.train()
    totals = []
    for _ in range(40):
        losses = detector(image[None], targets)
        assert set(losses) == {"classification", "box_regression", "mask"}
        assert all(torch.isfinite(value) for value in losses.values())
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(float(total.detach()))
    assert np.mean(totals[-3:]) < 0.6 * np.mean(totals[:3]), totals

    detector.eval()
    result = detector(image[None])[0]
    assert result["boxes"].shape[1] == 6 and len(result["boxes"]) == len(result["scores"]) == len(result["labels"])
    top = result["boxes"][torch.argsort(result["scores"], descending=True)[:4]]
    centres = (top[:, :3] + top[:, 3:]) / 2
    for centre, _ in SPHERES:
        distance = torch.linalg.norm(centres - torch.tensor(centre), dim=1).min()
        assert distance < 4.0, (centre, centres)
    labels = networks.paste_masks(result["masks"], result["mask_origins"], mask.shape)
    assert labels.shape == mask.shape and int(labels.max()) <= len(result["boxes"])


def test_mask_head_learns_a_sphere():
    torch.manual_seed(1)
    image, boxes, mask = _sphere_case()
    detector = networks.NoduleDetector.build("tiny")
    optimizer = torch.optim.Adam(detector.mask_head.parameters(), lr=1e-2)
    target = [{"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long), "masks": mask}]
    for _ in range(40):
        loss = detector.mask_loss(image[None], target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    detector.eval()
    masks, origins = detector.predict_masks(image, boxes)
    assert len(masks) == len(boxes) and origins.shape == (len(boxes), 3)
    pasted = networks.paste_masks(masks, origins, mask.shape) > 0
    assert _dice(pasted, mask) > 0.7


def _expected_zoo_keys():
    """state_dict keys of the zoo's RetinaNet, written from MONAI's and torchvision's sources (not built here).

    Sources (MONAI 1.6.1 line numbers; the bundle's configs/train.json builds resnet50 + [1, 2] + RetinaNet):
    - monai/apps/detection/networks/retinanet_network.py:300-309 ``feature_extractor``, ``classification_head``,
      ``regression_head``; :87/:163 each head's ``conv`` = Sequential of 4 x (Conv, GroupNorm, ReLU), so weights at
      indices 0,1 / 3,4 / 6,7 / 9,10; :94 ``cls_logits``, :165 ``bbox_reg``.
    - monai/networks/blocks/backbone_fpn_utils.py:114-115 ``body`` (torchvision IntermediateLayerGetter) and ``fpn``.
      torchvision/models/_utils.py IntermediateLayerGetter.__init__ keeps the model's children in order until the
      last returned layer (layer2): conv1, bn1, act, maxpool, layer1, layer2 -- no layer3/layer4/fc.
    - monai/networks/blocks/feature_pyramid_network.py:191-192 ``inner_blocks.i`` / ``layer_blocks.i`` per returned
      layer (conv with bias); LastLevelMaxPool has no weights.
    - monai/networks/nets/resnet.py:154-160 ResNetBottleneck conv1..3 (no bias), bn1..3; :318 ``downsample`` =
      Sequential(conv, norm) in the first block of each layer (shortcut B; bias_downsample=True -> conv bias).
    """
    def batchnorm(prefix):
        return [f"{prefix}.{name}" for name in ("weight", "bias", "running_mean", "running_var",
                                                "num_batches_tracked")]

    keys = ["feature_extractor.body.conv1.weight", *batchnorm("feature_extractor.body.bn1")]
    for layer, blocks in ((1, 3), (2, 4)):
        for block in range(blocks):
            prefix = f"feature_extractor.body.layer{layer}.{block}"
            for index in (1, 2, 3):
                keys += [f"{prefix}.conv{index}.weight", *batchnorm(f"{prefix}.bn{index}")]
            if block == 0:
                keys += [f"{prefix}.downsample.0.weight", f"{prefix}.downsample.0.bias",
                         *batchnorm(f"{prefix}.downsample.1")]
    for kind in ("inner_blocks", "layer_blocks"):
        for level in (0, 1):
            keys += [f"feature_extractor.fpn.{kind}.{level}.weight", f"feature_extractor.fpn.{kind}.{level}.bias"]
    for head, last in (("classification_head", "cls_logits"), ("regression_head", "bbox_reg")):
        for index in (0, 1, 3, 4, 6, 7, 9, 10):
            keys += [f"{head}.conv.{index}.weight", f"{head}.conv.{index}.bias"]
        keys += [f"{head}.{last}.weight", f"{head}.{last}.bias"]
    return keys


def test_zoo_config_has_the_bundle_state_dict_keys():
    detector = networks.NoduleDetector.build("zoo")
    state = detector.state_dict()
    assert sorted(state) == sorted(_expected_zoo_keys())
    # 3 anchors x 1 class; 3 anchors x 6 box offsets; FPN inputs 256 (layer1) and 512 (layer2) channels.
    assert state["classification_head.cls_logits.weight"].shape[0] == 3
    assert state["regression_head.bbox_reg.weight"].shape[0] == 18
    assert state["feature_extractor.fpn.inner_blocks.1.weight"].shape[:2] == (256, 512)
    assert state["feature_extractor.body.conv1.weight"].shape == (64, 1, 7, 7, 7)
    assert list(detector.size_divisible) == [16, 16, 8]


def test_detector_architecture_rebuilds_with_same_keys():
    detector = networks.NoduleDetector.build("tiny")
    description = detector.architecture()
    assert description["name"] == "RecognitionCore.networks.NoduleDetector"
    rebuilt = build_architecture(description)
    assert list(rebuilt.state_dict()) == list(detector.state_dict())
    rebuilt.load_state_dict(detector.state_dict(), strict=True)
    assert networks.detector_architecture("tiny") == description
    assert_raises(InputError, networks.NoduleDetector.build, "huge", match="huge")
    assert_raises(InputError, networks.NoduleDetector, "tiny", fpn_width=3, match="fpn_width")


def test_backbone_stages_order():
    detector = networks.NoduleDetector.build("tiny")
    stages = networks.backbone_stages(detector)
    body = detector.feature_extractor.body
    assert [name for name, _ in stages] == ["stem", "stage1", "stage2"]
    assert stages[0][1].conv1 is body.conv1 and stages[1][1] is body.layer1 and stages[2][1] is body.layer2

    unet = networks.build_segmenter("unet", 1, 3, "tiny")
    unet_stages = networks.backbone_stages(unet)
    assert [name for name, _ in unet_stages] == ["stem", "stage1", "stage2"]
    channels = [[m for m in module.modules() if isinstance(m, torch.nn.Conv3d)][0].out_channels
                for _, module in unet_stages]
    assert channels == [4, 8, 16]

    segresnet = networks.build_segmenter("segresnet", 1, 3, "tiny")
    names = [name for name, _ in networks.backbone_stages(segresnet)]
    assert names == ["stem", "stage1", "stage2", "stage3"]
    assert networks.backbone_stages(segresnet)[0][1] is segresnet.convInit
    assert_raises(InputError, networks.backbone_stages, torch.nn.Linear(2, 2), match="Linear")


def test_freeze_stages_keeps_frozen_weights_and_batchnorm_statistics():
    torch.manual_seed(2)
    image, boxes, mask = _sphere_case()
    detector = networks.NoduleDetector.build("tiny")
    frozen = networks.freeze_stages(detector, 2)
    expected = [name for name, _ in detector.named_parameters()
                if name.startswith(("feature_extractor.body.conv1.", "feature_extractor.body.bn1.",
                                    "feature_extractor.body.layer1."))]
    assert frozen == expected and frozen
    assert all(not p.requires_grad for name, p in detector.named_parameters() if name in frozen)
    assert all(p.requires_grad for name, p in detector.named_parameters() if name not in frozen)

    before = {name: value.clone() for name, value in detector.state_dict().items()}
    groups = networks.parameter_groups(detector, backbone_lr=1e-4, head_lr=1e-2)
    optimizer = torch.optim.SGD(groups, lr=1e-2)
    detector.train()  # must not wake the frozen BatchNorm layers
    targets = [{"boxes": boxes, "labels": torch.zeros(len(boxes), dtype=torch.long)}]
    loss = sum(detector(image[None], targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = detector.state_dict()
    frozen_prefixes = ("feature_extractor.body.conv1.", "feature_extractor.body.bn1.", "feature_extractor.body.layer1.")
    for name, value in after.items():
        if name.startswith(frozen_prefixes):
            assert torch.equal(value, before[name]), name  # weights and running statistics
    assert not torch.equal(after["feature_extractor.body.layer2.0.bn1.running_mean"],
                           before["feature_extractor.body.layer2.0.bn1.running_mean"])
    assert not torch.equal(after["feature_extractor.body.layer2.0.conv1.weight"],
                           before["feature_extractor.body.layer2.0.conv1.weight"])
    assert not torch.equal(after["classification_head.cls_logits.weight"],
                           before["classification_head.cls_logits.weight"])

    unfrozen = networks.unfreeze_stages(detector)
    assert set(frozen) <= set(unfrozen) and all(p.requires_grad for p in detector.parameters())
    assert detector.feature_extractor.body.bn1.training
    assert_raises(InputError, networks.freeze_stages, detector, 4, match="3")


def test_parameter_groups_split_backbone_and_head():
    unet = networks.build_segmenter("unet", 1, 2, "tiny")
    networks.freeze_stages(unet, 1)
    groups = networks.parameter_groups(unet, backbone_lr=1e-4, head_lr=1e-3)
    assert [(group["name"], group["lr"]) for group in groups] == [("backbone", 1e-4), ("head", 1e-3)]
    grouped = sum(p.numel() for group in groups for p in group["params"])
    assert grouped == sum(p.numel() for p in unet.parameters() if p.requires_grad) < networks.parameter_count(unet)
    assert_raises(InputError, networks.parameter_groups, unet, -1.0, 1e-3, match="-1")


def test_build_segmenter_shapes_and_card_description():
    torch.manual_seed(3)
    for name in ("unet", "segresnet"):
        network = networks.build_segmenter(name, in_channels=1, out_channels=3, size="tiny")
        with torch.no_grad():
            output = network(torch.rand(1, 1, 32, 32, 16))
        assert output.shape == (1, 3, 32, 32, 16), name
        description = networks.segmenter_architecture(name, 1, 3, "tiny")
        assert description["name"].startswith("monai.networks.nets.")
        rebuilt = build_architecture(description)
        assert type(rebuilt) is type(network)
        assert list(rebuilt.state_dict()) == list(network.state_dict())
        rebuilt.load_state_dict(network.state_dict(), strict=True)
    assert_raises(InputError, networks.build_segmenter, "vnet", 1, 2, match="vnet")
    assert_raises(InputError, networks.build_segmenter, "unet", 1, 2, "huge", match="huge")
