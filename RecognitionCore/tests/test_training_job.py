"""Background training: the argument list, a real tiny run through the subprocess, cancel, and failures."""

import time

from RecognitionCore.datasets import write_synthetic_segmentation_dataset
from RecognitionCore.errors import InputError, RecognitionError
from RecognitionCore.models import Catalogue
from RecognitionCore.phantoms import ABDOMEN_LABELS
from RecognitionCore.testing import assert_raises
from RecognitionCore.training_job import TrainingJob, training_arguments

# A labelmap read from a folder has no names, so every value the phantom writes must be in the label set.
PHANTOM_LABELS = [option for value, name in ABDOMEN_LABELS.items() for option in ("--label", f"{value}={name}")]
TINY_SEGMENTATION = PHANTOM_LABELS + ["--spacing-mm", "8", "8", "8", "--window", "-200", "300",
                                      "--roi", "24", "24", "16", "--size", "tiny", "--iterations", "2"]


def tiny_job(images, output) -> TrainingJob:
    return TrainingJob(training_arguments("segmentation", images, output, "tiny", epochs=1, device="cpu",
                                          extra=TINY_SEGMENTATION))


def poll_until_finished(job: TrainingJob, timeout_s: float = 120.0) -> list:
    """Every progress report of the job until it ends."""
    reports, deadline = [], time.monotonic() + timeout_s
    while not job.finished:
        assert time.monotonic() < deadline, f"training did not finish in {timeout_s} s"
        report = job.poll()
        if report is not None:
            reports.append(report)
        time.sleep(0.05)
    return reports


def test_training_arguments_name_the_source_output_and_options(tmp_path):
    arguments = training_arguments("segmentation", tmp_path / "images", tmp_path / "out", " liver_v2 ",
                                   start="mir_abdomen_organs_unet", epochs=5, freeze_stages=1, device="cpu",
                                   extra=["--label", "1=liver"])
    assert arguments == ["segmentation", "--images", str(tmp_path / "images"), "--output", str(tmp_path / "out"),
                         "--model-id", "liver_v2", "--epochs", "5", "--freeze-stages", "1", "--device", "cpu",
                         "--start", "mir_abdomen_organs_unet", "--label", "1=liver"]
    from_json = training_arguments("detection", tmp_path / "dataset.json", tmp_path / "out", "nodules")
    assert from_json[:3] == ["detection", "--dataset", str(tmp_path / "dataset.json")]
    assert "--start" not in from_json
    for task, source, output, model_id, epochs, problem in (
            ("classification", tmp_path, tmp_path, "m", 1, "classification"),
            ("detection", tmp_path, tmp_path, " ", 1, "id"),
            ("detection", tmp_path, tmp_path, "m", 0, "epoch"),
            ("detection", "", tmp_path, "m", 1, "training data"),
            ("detection", tmp_path, "", "m", 1, "output folder")):
        assert_raises(InputError, training_arguments, task, source, output, model_id, epochs=epochs, match=problem)


def test_a_tiny_training_reports_progress_and_writes_a_model_card(tmp_path):
    images = tmp_path / "images"
    write_synthetic_segmentation_dataset(images, 3, seed=0, kind="abdomen", size_ijk=(48, 48, 24))
    job = tiny_job(images, tmp_path / "model")
    job.start()
    reports = poll_until_finished(job)
    assert job.returncode == 0, job.messages
    fractions = [fraction for fraction, _ in reports]
    assert len(fractions) >= 2 and fractions == sorted(fractions) and fractions[-1] > fractions[0]
    assert all(0.0 <= fraction <= 1.0 and message for fraction, message in reports)
    manifest = job.result_manifest()
    assert manifest == tmp_path / "model" / "tiny.json" and manifest.is_file()
    card = Catalogue.with_user_manifests([tmp_path / "model"]).get("tiny")  # the output folder is a catalogue folder
    assert card.task == "segmentation" and "validation (best)" in card.metrics
    assert any(line.startswith("model card:") for line in job.messages)
    summary = job.result_summary()
    assert f"Model card: {manifest}" in summary and "validation (best): " in summary


def cancel_after_the_first_report(job: TrainingJob) -> None:
    job.start()
    deadline = time.monotonic() + 60.0
    while job.poll() is None:
        assert not job.finished and time.monotonic() < deadline, "no progress report"
        time.sleep(0.05)
    assert (job.output_dir / "training" / "dataset.json").is_file()  # written before training: something to undo
    job.cancel()
    assert job.finished and job.cancelled and job.error() is None


def test_cancel_after_the_first_report_leaves_no_output(tmp_path):
    images = tmp_path / "images"
    write_synthetic_segmentation_dataset(images, 3, seed=0, kind="abdomen", size_ijk=(48, 48, 24))
    job = tiny_job(images, tmp_path / "model")
    cancel_after_the_first_report(job)
    assert not (tmp_path / "model").exists()
    assert_raises(RecognitionError, job.result_manifest, match="not finished")

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("the user's")
    cancel_after_the_first_report(tiny_job(images, existing))
    assert [path.name for path in existing.iterdir()] == ["notes.txt"]


def test_bad_training_data_is_reported_with_its_path(tmp_path):
    missing = tmp_path / "no_such_folder"
    job = tiny_job(missing, tmp_path / "model")
    assert_raises(InputError, job.start, match=str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    job = tiny_job(empty, tmp_path / "model")
    job.start()
    deadline = time.monotonic() + 60.0
    error = None
    while error is None:
        assert time.monotonic() < deadline, "the failing training did not end"
        try:
            job.poll()
        except RecognitionError as raised:
            error = raised
        time.sleep(0.05)
    assert job.returncode not in (None, 0)
    assert str(empty) in str(error) and "Training failed" in str(error)
    assert_raises(RecognitionError, job.result_manifest, match=str(empty))
