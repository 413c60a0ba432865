"""Run the same test functions under pytest (here, CI) and inside the Slicer app (each module's Test class).

Tests are plain functions ``test_*`` whose parameters name fixtures: ``tmp_path``, ``app`` and ``shared_data``.
pytest gets them from ``conftest.py``; inside Slicer, ``run_test_functions`` builds them. Skips use
``unittest.SkipTest``, which both honour.
"""

from __future__ import annotations

import importlib
import inspect
import os
import shutil
import tempfile
import traceback
import unittest
from pathlib import Path
from typing import Callable, Optional

import numpy as np

SHARED_DATA_ENV = "MIR_SHARED_DATA"


def assert_raises(exception_type, function: Callable, *args, match: Optional[str] = None, **kwargs):
    """Call ``function`` and assert it raises ``exception_type`` (with ``match`` in its message); return the error."""
    try:
        function(*args, **kwargs)
    except exception_type as error:
        if match is not None and match.lower() not in str(error).lower():
            raise AssertionError(f"{exception_type.__name__} raised, but {match!r} is not in its message: {error}")
        return error
    raise AssertionError(f"{getattr(function, '__name__', function)} did not raise {exception_type.__name__}")


def shared_data_dir() -> Path:
    """The real CT data beside the checkout (``../shared/data``), or ``$MIR_SHARED_DATA``; skip when absent."""
    candidates = [os.environ.get(SHARED_DATA_ENV)]
    here = Path(__file__).resolve()
    candidates += [str(parent / "shared" / "data") for parent in here.parents]
    for candidate in candidates:
        if candidate and (Path(candidate) / "README.md").is_file():
            return Path(candidate)
    raise unittest.SkipTest(f"real CT data not found (../shared/data or ${SHARED_DATA_ENV})")


def ct_like_volume_node(name: str, slices: int = 24):
    """A small CT-like volume node in HU (0.8 x 0.8 x 2.5 mm voxels): air around a soft-tissue body with a bone."""
    import slicer.util  # here, so that the rest of this module needs no MRML

    _, j, i = np.indices((slices, 48, 48))
    array = np.where(((j - 24) / 19) ** 2 + ((i - 24) / 22) ** 2 < 1, 40, -1000).astype(np.int16)
    array[:, 24:30, 21:27] = 700
    node = slicer.util.addVolumeFromArray(array, name=name)
    node.SetSpacing(0.8, 0.8, 2.5)
    return node


def _make_fixture(name: str, cleanups: list):
    if name == "tmp_path":
        path = Path(tempfile.mkdtemp(prefix="mir-test-"))
        cleanups.append(lambda: shutil.rmtree(path, ignore_errors=True))
        return path
    if name == "app":
        from .headless import current_app, inside_slicer_app
        app = current_app()
        if inside_slicer_app():
            app.scene.Clear(0)
        return app
    if name == "shared_data":
        return shared_data_dir()
    raise RuntimeError(f"unknown test fixture {name!r}")


def run_test_functions(module_names, log: Callable[[str], None] = print) -> dict:
    """Run every ``test_*`` function of the named modules; return counts. Used by the modules' Test classes."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for module_name in module_names:
        module = importlib.import_module(module_name)
        for name, function in inspect.getmembers(module, inspect.isfunction):
            if not name.startswith("test_") or function.__module__ != module.__name__:
                continue
            cleanups: list = []
            try:
                kwargs = {p: _make_fixture(p, cleanups) for p in inspect.signature(function).parameters}
                function(**kwargs)
                counts["passed"] += 1
            except unittest.SkipTest as skip:
                counts["skipped"] += 1
                log(f"SKIP {module_name}.{name}: {skip}")
            except Exception:
                counts["failed"] += 1
                log(f"FAIL {module_name}.{name}\n{traceback.format_exc()}")
            finally:
                for cleanup in cleanups:
                    cleanup()
    log(f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
    return counts
