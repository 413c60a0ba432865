"""Training and fine-tuning on generated cases: the loss falls, checkpoints reload and resume, frozen stages stay as
they were while the rest learns, and bad datasets or a full disk give clear errors."""

import dataclasses

import numpy as np
import torch

from RecognitionCore import datasets, networks, training
from RecognitionCore.errors import InputError
from RecognitionCore.models import ModelCard, sha256_of_file
from RecognitionCore.testing import assert_raises

TASK = training.SegmentationTask({1: "liver", 2: "spleen"}, (8.0, 8.0, 8.0),
                                 {"type": "window", "hu_min": -200, "hu_max": 300}, (24, 24, 16))


def tiny_unet():
    return networks.segmenter_architecture("unet", out_channels=TASK.out_channels, size="tiny")


def config(**changes):
    settings = dict(max_epochs=2, iterations_per_epoch=4, batch_size=2, learning_rate=3e-3, device="cpu",
                    min_free_disk_mb=1.0)
    settings.update(changes)
    return training.TrainingConfig(**settings)


def abdomen_cases(tmp_path, count=3):
    return datasets.write_synthetic_segmentation_dataset(tmp_path / "data", count, seed=0, kind="abdomen",
                                                         size_ijk=(48, 48, 24))


def test_segmenter_loss_falls_and_the_best_checkpoint_reloads(tmp_path):
    cases = abdomen_cases(tmp_path)
    network, result, reinitialised = training.train_segmenter(
        TASK, cases[:2], cases[2:], tmp_path / "run", config(max_epochs=3), architecture=tiny_unet())
    losses = [row["train_loss"] for row in result.log]
    assert losses[-1] < losses[0], losses
    assert reinitialised == [] and result.epochs_run == 3
    assert (tmp_path / "run" / "training" / "learning_curves.png").stat().st_size > 5000
    reloaded = training.load_best_weights(networks.build_segmenter("unet", out_channels=3, size="tiny"),
                                          result.output_dir)
    for name, value in network.state_dict().items():
        assert torch.equal(value, reloaded.state_dict()[name]), name


def test_fine_tuning_keeps_frozen_stages_and_trains_the_rest(tmp_path):
    cases = abdomen_cases(tmp_path)
    start_network = networks.build_segmenter("unet", out_channels=3, size="tiny")
    torch.save(start_network.state_dict(), tmp_path / "start.pt")
    start = ModelCard(id="start", title="start", task="segmentation", labels=TASK.label_names,
                      spacing_mm=TASK.spacing_mm, intensity=TASK.intensity, architecture=tiny_unet(),
                      weights={"file": "start.pt", "sha256": sha256_of_file(tmp_path / "start.pt")},
                      roi_size=TASK.roi_size, licence="test", base_dir=tmp_path)
    network, result, _ = training.train_segmenter(TASK, cases[:2], cases[2:], tmp_path / "run",
                                                  config(freeze_stages=1), start=start, architecture=tiny_unet())
    before, after = start_network.state_dict(), network.state_dict()
    frozen = set(result.frozen_parameters)
    assert frozen and all(name.startswith("model.0.") for name in frozen)  # the stem of the UNet
    for name in after:
        if name in frozen or (name.startswith("model.0.") and "running" in name):
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    trained = [name for name in after if name not in frozen and after[name].dtype.is_floating_point
               and not torch.equal(before[name], after[name])]
    assert len(trained) > 5
    assert np.isfinite(result.start_metric) and np.isfinite(result.best_metric)


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    cases = abdomen_cases(tmp_path)
    training.train_segmenter(TASK, cases[:2], cases[2:], tmp_path / "run", config(max_epochs=1),
                             architecture=tiny_unet())
    _, result, _ = training.train_segmenter(TASK, cases[:2], cases[2:], tmp_path / "run", config(max_epochs=2),
                                            architecture=tiny_unet(), resume=True)
    assert [row["epoch"] for row in result.log] == [1, 2]


def test_bad_datasets_and_a_full_disk_are_named(tmp_path):
    cases = abdomen_cases(tmp_path)
    no_positive = training.SegmentationTask({1: "no such organ"}, TASK.spacing_mm, TASK.intensity, TASK.roi_size)
    assert_raises(InputError, training.train_segmenter, no_positive, cases[:2], cases[2:], tmp_path / "a",
                  config(), architecture=networks.segmenter_architecture("unet", out_channels=2, size="tiny"),
                  match="no labelled voxel")
    assert_raises(InputError, training.train_segmenter, TASK, cases[:2], cases[2:], tmp_path / "b",
                  config(min_free_disk_mb=1e12), architecture=tiny_unet(), match="Not enough free disk space")
    broken = datasets.SegmentationCase("broken", "broken", str(tmp_path / "missing.nrrd"), cases[0].label_path,
                                       cases[0].label_names)
    _, result, _ = training.train_segmenter(TASK, [cases[0], broken, cases[1]], cases[2:], tmp_path / "c",
                                            config(max_epochs=1), architecture=tiny_unet())
    assert result.epochs_run == 1  # the corrupt case was skipped with a warning


DETECTION = training.DetectionTask((6.0, 6.0, 6.0), {"type": "window", "hu_min": -1024, "hu_max": 300},
                                   (48, 48, 40), positive_fraction=0.9)  # one window covers a whole test volume


def test_detector_loss_falls_and_frozen_stages_stay(tmp_path):
    cases = datasets.write_synthetic_detection_dataset(tmp_path / "chest", 3, seed=5, size_ijk=(48, 48, 32),
                                                       spacing_mm=(6.0, 6.0, 8.0), nodules_per_case=3)
    architecture = networks.detector_architecture("tiny")
    network, result, _ = training.train_detector(DETECTION, cases[:2], cases[2:], tmp_path / "scratch",
                                                 config(max_epochs=2, iterations_per_epoch=10),
                                                 architecture=architecture)
    losses = [row["train_loss"] for row in result.log]
    assert losses[-1] < losses[0], losses
    assert 0.0 <= result.best_metric <= 1.0
    card = training.write_model(network, tmp_path / "model", {"id": "tiny_detector", "title": "t", "task": "detection",
                                                              "labels": {"0": "nodule"}, "licence": "test",
                                                              "spacing_mm": [6, 6, 6], "roi_size": [48, 48, 40],
                                                              "intensity": DETECTION.intensity},
                                architecture, result, {"data": "3 phantoms"})
    fine_tuned, tuned, _ = training.train_detector(DETECTION, cases[:2], cases[2:], tmp_path / "tuned",
                                                   config(max_epochs=1, iterations_per_epoch=3, freeze_stages=2),
                                                   start=card, architecture=architecture)
    before = network.state_dict()
    for name in tuned.frozen_parameters:
        assert torch.equal(before[name], fine_tuned.state_dict()[name]), name
    assert any(not torch.equal(before[name], value) for name, value in fine_tuned.state_dict().items()
               if name not in tuned.frozen_parameters and value.dtype.is_floating_point)
    assert tuned.start_metric == result.best_metric  # the starting model, judged on the same validation case


def test_dense_pretraining_trains_the_features_and_then_the_heads_on_a_frozen_backbone(tmp_path):
    cases = datasets.write_synthetic_detection_dataset(tmp_path / "chest", 2, seed=5, size_ijk=(48, 48, 32),
                                                       spacing_mm=(6.0, 6.0, 8.0), nodules_per_case=3)
    prepared = [datasets.prepare_detection_case(*datasets.load_detection_case(case), DETECTION.spacing_mm,
                                                DETECTION.intensity) for case in cases[:1]]
    torch.manual_seed(0)
    network = networks.NoduleDetector("tiny")
    before = {name: value.clone() for name, value in network.state_dict().items()}
    losses = training.pretrain_features(network, prepared, DETECTION, 16, 3e-3, 2, 0, "cpu")
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    after = network.state_dict()
    assert not torch.equal(before["feature_extractor.body.conv1.weight"], after["feature_extractor.body.conv1.weight"])
    assert all(torch.equal(before[name], after[name]) for name in after if "head" in name)  # only the features learn

    task = dataclasses.replace(DETECTION, dense_pretraining_iterations=4)
    _, result, _ = training.train_detector(task, cases[:1], cases[1:], tmp_path / "run",
                                           config(max_epochs=1, iterations_per_epoch=2, freeze_stages=3),
                                           architecture=networks.detector_architecture("tiny"))
    body = [name for name, _ in network.named_parameters() if name.startswith("feature_extractor.body.")]
    assert sorted(result.frozen_parameters) == sorted(body)


def test_detector_refuses_a_dataset_without_nodules(tmp_path):
    cases = datasets.write_synthetic_detection_dataset(tmp_path / "chest", 2, seed=5, size_ijk=(64, 64, 40),
                                                       spacing_mm=(5.0, 5.0, 8.0), nodules_per_case=1)
    empty = [datasets.DetectionCase(case.case_id, case.patient_id, case.image_path, ()) for case in cases]
    assert_raises(InputError, training.train_detector, DETECTION, empty[:1], cases[1:], tmp_path / "run", config(),
                  architecture=networks.detector_architecture("tiny"), match="no nodule")


def test_lateral_labels_are_never_flipped_left_right():
    assert 0 not in training.augmentation_settings({1: "kidney_left", 2: "kidney_right"}).flip_axes
    assert 0 in training.augmentation_settings({1: "liver", 2: "spleen"}).flip_axes
