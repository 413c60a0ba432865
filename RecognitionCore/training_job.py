"""Training in the background: ``python -m RecognitionCore.cli train`` in a subprocess, with progress and cancel.

Training takes minutes to hours, so the panels must not run it in Slicer's own process: a subprocess keeps the
application responsive, and cancelling it frees the GPU memory at once. The job is free of Qt: a panel polls it from a
timer, a script from a loop. Inside Slicer the child runs with ``PythonSlicer`` (Slicer's Python launcher, as
SlicerTotalSegmentator does), elsewhere with the running interpreter.
"""

import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .errors import InputError, RecognitionError
from .models import TASKS, Catalogue

__all__ = ["TrainingJob", "training_arguments", "python_executable"]

# A progress line of the command line, as ``cli._print_progress`` writes it: "[ 12.3%] message".
PROGRESS_LINE = re.compile(r"^\[\s*(\d+(?:\.\d+)?)%\]\s?(.*)$")
ERROR_CONTEXT_LINES = 8
PACKAGE_PARENT = Path(__file__).resolve().parent.parent  # the folder to put on PYTHONPATH


def python_executable() -> str:
    """Slicer's Python launcher when it is on PATH (inside the application), otherwise the running interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def training_arguments(task: str, dataset_or_images, output_dir, model_id: str, start: Optional[str] = None,
                       epochs: int = 30, freeze_stages: int = 2, device: str = "auto",
                       extra: Sequence[str] = ()) -> List[str]:
    """The ``cli train`` arguments (after ``train``) for a dataset JSON file or an images folder.

    ``start`` is the catalogue id of the model to fine-tune (None: from scratch); ``extra`` are further ``cli train``
    options (e.g. ``--label 1=liver``), passed as they are.
    """
    if not str(dataset_or_images or "").strip():
        raise InputError("Choose the training data: a dataset JSON file or a folder of images.")
    if not str(output_dir or "").strip():
        raise InputError("Choose an output folder for the new model.")
    if task not in TASKS:
        raise InputError(f"Unknown training task {task!r} (expected one of {list(TASKS)})")
    if not str(model_id).strip():
        raise InputError("The new model needs an id.")
    if int(epochs) < 1:
        raise InputError(f"Training needs at least one epoch; got {epochs}.")
    source = Path(dataset_or_images)
    source_option = "--dataset" if source.suffix.lower() == ".json" else "--images"
    arguments = [task, source_option, str(source), "--output", str(output_dir), "--model-id", str(model_id).strip(),
                 "--epochs", str(int(epochs)), "--freeze-stages", str(int(freeze_stages)), "--device", device]
    if start:
        arguments += ["--start", start]
    return arguments + [str(argument) for argument in extra]


class TrainingJob:
    """One run of ``cli train`` in a subprocess: ``start``, then ``poll`` until ``finished``; ``cancel`` at any time.

    A cancelled job removes what it wrote (the whole output folder when it made it), so no half-trained model card is
    left for the catalogue to find.
    """

    def __init__(self, arguments: Sequence[str], python: Optional[str] = None) -> None:
        self.arguments = [str(argument) for argument in arguments]
        if not _option_value(self.arguments, "--output"):
            raise InputError("The training job needs an output folder (--output).")
        self.output_dir = Path(_option_value(self.arguments, "--output"))
        self.model_id = _option_value(self.arguments, "--model-id", default="my_model")
        self.python = python or python_executable()
        self.returncode: Optional[int] = None
        self.cancelled = False
        self.messages: List[str] = []  # output lines that are not progress lines: results, warnings, errors
        self._process: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._reader: Optional[threading.Thread] = None
        self._output_existed = False
        self._entries_before: set = set()

    @property
    def command(self) -> List[str]:
        return [self.python, "-m", "RecognitionCore.cli", "train"] + self.arguments

    @property
    def running(self) -> bool:
        return self._process is not None and self.returncode is None

    @property
    def finished(self) -> bool:
        return self.returncode is not None

    def start(self) -> None:
        """Check the dataset path and launch the command; its output is read by a thread, so ``poll`` never blocks."""
        if self._process is not None:
            raise RecognitionError("This training job was already started.")
        source = _option_value(self.arguments, "--dataset") or _option_value(self.arguments, "--images")
        if not source or not Path(source).exists():
            raise InputError(f"Training data not found: {source}")
        self._output_existed = self.output_dir.exists()
        self._entries_before = set(self.output_dir.iterdir()) if self._output_existed else set()
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(PACKAGE_PARENT)] + [path for path in environment.get("PYTHONPATH", "").split(os.pathsep) if path])
        try:
            self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, text=True, env=environment)
        except OSError as error:
            raise RecognitionError(f"Training could not start ({self.python}): {error}") from error
        self._reader = threading.Thread(target=self._read_output, name="training-output", daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        for line in self._process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # end of output

    def poll(self) -> Optional[Tuple[float, str]]:
        """The latest (fraction, message) reported since the last call, or None; never blocks.

        Once the process has ended, sets ``returncode``; raises RecognitionError, with the last lines it wrote, when
        it failed (not when it was cancelled).
        """
        if self._process is None:
            raise RecognitionError("The training job has not been started.")
        latest = None
        ended = False
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                ended = True
                break
            match = PROGRESS_LINE.match(line)
            if match:
                latest = (float(match.group(1)) / 100.0, match.group(2))
            elif line.strip():
                self.messages.append(line)
        if ended and self.returncode is None:
            self.returncode = self._process.wait()
        error = self.error()
        if error is not None:
            raise error
        return latest

    def error(self) -> Optional[RecognitionError]:
        """What went wrong, once the process has failed; None while it runs, after success and after cancel."""
        if self.returncode in (None, 0) or self.cancelled:
            return None
        context = "\n".join(self.messages[-ERROR_CONTEXT_LINES:]) or "(no output)"
        return RecognitionError(f"Training failed (exit status {self.returncode}):\n{context}")

    def cancel(self, timeout_s: float = 10.0) -> None:
        """Stop the process and remove what it wrote to the output folder."""
        if self._process is None or self.finished:
            return
        self.cancelled = True
        self._process.terminate()
        try:
            self._process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self.returncode = self._process.returncode
        self._reader.join(timeout=timeout_s)
        self._remove_output()

    def _remove_output(self) -> None:
        if not self._output_existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            return
        for entry in set(self.output_dir.iterdir()) - self._entries_before:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def result_manifest(self) -> Path:
        """The new model's one-card manifest ``<output>/<model-id>.json`` (for ``Catalogue.with_user_manifests``)."""
        if not self.finished or self.cancelled:
            raise RecognitionError("The training job has not finished.")
        error = self.error()
        if error is not None:
            raise error
        manifest = self.output_dir / f"{self.model_id}.json"
        if not manifest.is_file():
            raise RecognitionError(f"Training finished but wrote no model card: {manifest} is missing.")
        return manifest

    def result_summary(self) -> str:
        """The new model card and its validation metrics, as lines of text for the user."""
        manifest = self.result_manifest()
        catalogue = Catalogue(manifests=())
        catalogue.load(manifest)
        card = catalogue.get(self.model_id)
        lines = [f"Model card: {manifest}"]
        lines += [f"{name}: {value:.3f}" if isinstance(value, float) else f"{name}: {value}"
                  for name, value in (card.metrics or {}).items()]
        return "\n".join(lines)


def _option_value(arguments: Sequence[str], option: str, default: Optional[str] = None) -> Optional[str]:
    """The value after ``option`` in an argument list (the last one when repeated)."""
    indices = [index for index, argument in enumerate(arguments) if argument == option]
    if not indices or indices[-1] + 1 >= len(arguments):
        return default
    return arguments[indices[-1] + 1]
