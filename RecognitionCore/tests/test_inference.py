"""Sliding-window runner: equal to MONAI's whole-volume result in bounded memory, progress, cancel, input checks."""

import gc

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

from RecognitionCore import inference
from RecognitionCore.device import choose_device, describe_device
from RecognitionCore.errors import Cancelled, InputError
from RecognitionCore.inference import SlidingWindowRunner
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

ROI = (16, 24, 24)


def _tiny_network():
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0).eval()


def _volume(shape=(40, 48, 56)):
    return np.random.default_rng(7).normal(size=shape).astype(np.float32)


def _monai_logits(network, volume, blend_mode, overlap=0.25, cval=0.0):
    with torch.no_grad():
        inputs = torch.from_numpy(volume)[None, None]
        return sliding_window_inference(inputs, ROI, 3, network, overlap=overlap, mode=blend_mode, cval=cval)[0].numpy()


def _count_slab_shifts(run):
    """Call ``run`` and count how often the accumulator slab moved on (several slabs = memory was bounded)."""
    original = inference._SlabAccumulator.shift
    shifts = []

    def counting_shift(self, new_base):
        shifts.append(new_base)
        original(self, new_base)

    inference._SlabAccumulator.shift = counting_shift
    try:
        return run(), len(shifts)
    finally:
        inference._SlabAccumulator.shift = original


def test_slabs_equal_monai_whole_volume():
    network, volume = _tiny_network(), _volume()
    twenty_planes = 20 * (3 + 1) * 48 * 56 * 4  # 3 channels + weights, float32: a slab deeper than the ROI
    for blend_mode, overlap, budget in (("gaussian", 0.25, 1), ("constant", 0.5, 1), ("gaussian", 0.5, twenty_planes)):
        expected = _monai_logits(network, volume, blend_mode, overlap)
        runner = SlidingWindowRunner(network, ROI, sw_batch_size=3, overlap=overlap, blend_mode=blend_mode,
                                     device="cpu", memory_budget_bytes=budget)
        logits, shifts = _count_slab_shifts(lambda: runner(volume, output="logits"))
        assert shifts >= 2, f"only {shifts} slab shifts: the budget did not force several slabs"
        assert logits.shape == expected.shape and logits.dtype == np.float32
        difference = float(np.abs(logits - expected).max())
        assert difference < 1e-4, f"{blend_mode}, overlap {overlap}: max difference {difference}"


def test_labels_and_probabilities_match_monai():
    network, volume = _tiny_network(), _volume()
    expected = _monai_logits(network, volume, "gaussian")
    runner = SlidingWindowRunner(network, ROI, sw_batch_size=3, blend_mode="gaussian", device="cpu",
                                 memory_budget_bytes=1)
    labels = runner(volume, output="labels")
    assert labels.dtype == np.uint8 and labels.shape == volume.shape
    assert np.array_equal(labels, expected.argmax(0))
    assert len(np.unique(labels)) > 1, "a constant label map would not test the argmax"
    probabilities = runner(volume, output="probabilities", channels=[2, 0], probability_dtype=np.float16)
    softmax = torch.softmax(torch.from_numpy(expected), dim=0).numpy()
    assert probabilities.shape == (2, *volume.shape) and probabilities.dtype == np.float16
    assert np.abs(probabilities.astype(np.float32) - softmax[[2, 0]]).max() < 1e-3
    on_disk = runner(volume, output="logits", memmap=True)
    assert isinstance(on_disk, np.memmap) and np.abs(on_disk - expected).max() < 1e-4


def test_progress_is_monotonic_and_reaches_one():
    reports = []
    runner = SlidingWindowRunner(_tiny_network(), ROI, sw_batch_size=2, device="cpu", memory_budget_bytes=1)
    runner(_volume(), progress=Progress(lambda fraction, message: reports.append((fraction, message))))
    fractions = [fraction for fraction, _ in reports]
    assert len(reports) > 3 and fractions[0] < 0.05 and fractions[-1] == 1.0
    assert all(later >= earlier for earlier, later in zip(fractions, fractions[1:])), fractions
    assert all(message for _, message in reports)


def test_cancel_raises_and_returns_nothing():
    token = CancelToken()
    reports = []

    def cancel_after_second(fraction, message):
        reports.append(fraction)
        if len(reports) == 2:
            token.cancel()

    runner = SlidingWindowRunner(_tiny_network(), ROI, sw_batch_size=2, device="cpu", memory_budget_bytes=1)
    results = []
    error = assert_raises(Cancelled, lambda: results.append(runner(_volume(),
                                                                   progress=Progress(cancel_after_second, token))))
    assert results == [] and len(reports) == 2
    gc.collect()
    leftovers = [item for item in gc.get_objects() if type(item) is inference._SlabAccumulator]
    assert error.__traceback__ is not None and leftovers == [], "a held Cancelled must not keep the accumulator"


def test_volume_smaller_than_roi_is_padded_and_cropped():
    network, volume = _tiny_network(), _volume((10, 48, 20))
    runner = SlidingWindowRunner(network, ROI, sw_batch_size=2, device="cpu")
    logits = runner(volume, output="logits")
    assert logits.shape == (3, *volume.shape)
    expected = _monai_logits(network, volume, "gaussian", cval=float(volume.min()))
    assert np.abs(logits - expected).max() < 1e-4
    labels = runner(torch.from_numpy(volume)[None], output="labels")
    assert labels.shape == volume.shape


def test_bad_input_is_rejected():
    runner = SlidingWindowRunner(_tiny_network(), ROI, device="cpu")
    volume = _volume()
    volume[3, 4, 5] = np.nan
    volume[6, 7, 8] = np.inf
    assert_raises(InputError, runner, volume, match="2 NaN")
    assert_raises(InputError, runner, np.zeros((48, 56), np.float32), match="3D")
    assert_raises(InputError, runner, np.zeros((0, 48, 56), np.float32), match="empty")
    assert_raises(InputError, runner, _volume(), output="mask", match="output")


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    assert "CPU" in describe_device(choose_device("cpu"))
    if torch.cuda.is_available():
        assert choose_device("auto").type == "cuda"
        return
    assert choose_device("auto").type in ("cpu", "mps")
    error = assert_raises(InputError, choose_device, "cuda", match="cuda")
    assert "cpu" in str(error)
    assert_raises(InputError, choose_device, "tpu-ish", match="device")
    reports_cuda = torch.cuda.is_available
    torch.cuda.is_available = lambda: True  # a driver that claims a GPU but fails at the first kernel
    try:
        assert choose_device("auto").type in ("cpu", "mps")
    finally:
        torch.cuda.is_available = reports_cuda


def test_input_kept_on_device_equals_staging_and_monai():
    """The GPU path (input uploaded in chunks, windows sliced on the device), forced on CPU: same results."""
    network = _tiny_network()
    chunk_voxels = inference._CHUNK_VOXELS
    inference._CHUNK_VOXELS = 3 * 48 * 56  # a few planes per upload and per finalised chunk
    try:
        for shape in ((40, 48, 56), (10, 48, 20)):
            volume = _volume(shape)
            expected = _monai_logits(network, volume, "gaussian", cval=float(volume.min()))
            staged = SlidingWindowRunner(network, ROI, sw_batch_size=3, device="cpu", memory_budget_bytes=1,
                                         input_on_device=False)
            on_device = SlidingWindowRunner(network, ROI, sw_batch_size=3, device="cpu", memory_budget_bytes=1,
                                            input_on_device=True)
            logits, shifts = _count_slab_shifts(lambda: on_device(volume, output="logits"))
            assert shifts >= (2 if shape[0] > 2 * ROI[0] else 0), f"{shape}: {shifts} slab shifts"
            assert np.array_equal(logits, staged(volume, output="logits")), shape
            assert np.abs(logits - expected).max() < 1e-4, shape
            assert np.array_equal(on_device(volume), staged(volume)), shape
        hounsfield = (_volume() * 300).astype(np.int16)
        assert np.array_equal(on_device(hounsfield, output="logits"), staged(hounsfield, output="logits"))
        volume = _volume()
        volume[3, 4, 5] = np.nan
        volume[36, 7, 8] = -np.inf  # in the last upload: still reported
        assert_raises(InputError, on_device, volume, match="2 NaN")
    finally:
        inference._CHUNK_VOXELS = chunk_voxels


def test_cancel_with_input_on_device_keeps_nothing():
    token = CancelToken()
    runner = SlidingWindowRunner(_tiny_network(), ROI, sw_batch_size=2, device="cpu", memory_budget_bytes=1,
                                 input_on_device=True)
    progress = Progress(lambda fraction, message: token.cancel() if fraction > 0.3 else None, token)
    error = assert_raises(Cancelled, runner, _volume(), progress=progress)
    gc.collect()
    leftovers = [item for item in gc.get_objects() if type(item) in (inference._DeviceWindows,
                                                                     inference._SlabAccumulator)]
    assert error.__traceback__ is not None and leftovers == [], "a held Cancelled must not keep the uploaded input"
