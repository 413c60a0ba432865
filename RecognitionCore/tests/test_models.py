"""Model catalogue: manifest checks, weights from a file, the cache or a local HTTP server, networks, MONAI bundles."""

import contextlib
import functools
import hashlib
import http.server
import importlib.util
import json
import os
import socket
import threading
import unittest
import warnings

import torch

from RecognitionCore.errors import Cancelled, ModelError
from RecognitionCore.models import (Catalogue, ModelCard, build_architecture, card_from_bundle,
                                    export_bundle, find_bundle_dir, load_bundle, load_network, resolve_card,
                                    resolve_weights, sha256_of_file)
from RecognitionCore.progress import CancelToken, Progress
from RecognitionCore.testing import assert_raises

UNET = "monai.networks.nets.UNet"
TINY_UNET_ARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
                  "num_res_units": 0}
OTHER_UNET_ARGS = dict(TINY_UNET_ARGS, channels=[8, 16])
DOWNLOAD_BYTES = 300_000  # several download chunks, so progress and cancel happen mid-file


def _entry(**changes):
    entry = {"id": "tiny", "title": "Tiny UNet", "task": "segmentation", "labels": {"1": "organ"},
             "spacing_mm": [1.0, 1.0, 2.0], "intensity": {"type": "window", "hu_min": -100, "hu_max": 200},
             "architecture": {"name": UNET, "args": TINY_UNET_ARGS},
             "weights": {"file": "tiny.pt", "sha256": "0" * 64}, "licence": "Apache-2.0"}
    entry.update(changes)
    return entry


def _tiny_network(args=None, seed=0):
    torch.manual_seed(seed)
    return build_architecture({"name": UNET, "args": args or TINY_UNET_ARGS}).eval()


def _save(obj, path):
    torch.save(obj, path)
    return sha256_of_file(path)


@contextlib.contextmanager
def _http_server(directory):
    """Serve ``directory`` on 127.0.0.1 (ephemeral port); yield (base URL, GET count per path)."""
    requests = {}

    class CountingHandler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests[self.path] = requests.get(self.path, 0) + 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(CountingHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _served_file(tmp_path, name="weights.bin"):
    served = tmp_path / "served"
    served.mkdir()
    (served / name).write_bytes(os.urandom(DOWNLOAD_BYTES))
    return served / name


def _download_card(url, sha256):
    return ModelCard.from_dict(_entry(weights={"url": url, "sha256": sha256, "size_bytes": DOWNLOAD_BYTES}))


def test_card_validation_names_the_bad_field():
    cases = [
        ({key: value for key, value in _entry().items() if key != "id"}, "'id'"),
        (_entry(spacing_mm=[1.0, -1.0, 2.0]), "spacing_mm"),
        (_entry(spacing_mm=[1.0, 2.0]), "spacing_mm"),
        (_entry(architecture={"name": "os.system", "args": {}}), "allowed namespace"),
        (_entry(architecture={"name": "monai.networks.nets._private", "args": {}}), "allowed namespace"),
        (_entry(task="classification"), "'task'"),
        (_entry(labels={"0": "organ"}), "'labels'"),
        (_entry(labels={"one": "organ"}), "'labels'"),
        (_entry(weights={"file": "tiny.pt", "sha256": "abc"}), "sha256"),
        (_entry(weights={"sha256": "0" * 64}), "'file' or a 'url'"),
        (_entry(weights={"url": "ftp://example.org/tiny.pt", "sha256": "0" * 64}), "weights.url"),
        (_entry(intensity={"type": "window", "hu_min": 200, "hu_max": -100}), "'intensity'"),
        (_entry(intensity={"type": "gamma"}), "'intensity'"),
        (_entry(roi_size=[96, 96]), "roi_size"),
        (_entry(wieghts={}), "unknown field"),
        (_entry(licence=""), "'licence'"),
        (_entry(bundle={"name": "spleen_ct_segmentation"}), "remove 'architecture'"),
    ]
    for entry, message in cases:
        error = assert_raises(ModelError, ModelCard.from_dict, entry, origin="user.json", match=message)
        assert "user.json" in str(error), error


def test_card_round_trip_keeps_every_field():
    card = ModelCard.from_dict(_entry(roi_size=[32, 32, 16], description="test", source="here"))
    assert card.labels == {1: "organ"} and card.spacing_mm == (1.0, 1.0, 2.0)
    assert card.intensity == {"type": "window", "hu_min": -100, "hu_max": 200, "out_min": 0.0, "out_max": 1.0,
                              "clip": True}
    assert ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_catalogue_lookup_override_and_manifest_errors(tmp_path):
    user_manifest = tmp_path / "user.json"
    user_manifest.write_text(json.dumps({"models": [
        _entry(id="user_unet"),
        {"id": "spleen_ct_segmentation", "title": "My spleen", "task": "segmentation",
         "bundle": {"name": "spleen_ct_segmentation", "dir": "bundles/spleen"}, "licence": "Apache-2.0"}]}))
    catalogue = Catalogue.with_user_manifests([tmp_path])
    assert "user_unet" in catalogue.ids(task="segmentation")
    assert catalogue.ids(task="detection") == ["lung_nodule_ct_detection", "mir_lung_nodule_retinanet"]
    assert catalogue.get("spleen_ct_segmentation").title == "My spleen"
    assert catalogue.get("user_unet").base_dir == tmp_path
    error = assert_raises(ModelError, catalogue.get, "livr", match="Unknown model 'livr'")
    assert "user_unet" in str(error) and "wholeBody_ct_segmentation" in str(error)
    assert_raises(ModelError, catalogue.ids, "classification", match="task")

    duplicated = tmp_path / "duplicated.json"
    duplicated.write_text(json.dumps({"models": [_entry(), _entry()]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{\"models\": [")
    for manifest, message in ((duplicated, "more than once"), (broken, "not valid JSON"),
                              (tmp_path / "absent.json", "not found")):
        error = assert_raises(ModelError, Catalogue, [manifest], match=message)
        assert manifest.name in str(error)


def test_shipped_catalogue_points_at_zoo_bundles_without_urls(tmp_path):
    catalogue = Catalogue()
    zoo_bundles = ["lung_nodule_ct_detection", "spleen_ct_segmentation", "wholeBody_ct_segmentation"]
    assert catalogue.ids() == sorted(zoo_bundles + ["mir_abdomen_organs_unet", "mir_lung_nodule_retinanet"])
    assert not any((catalogue.get(model_id).weights or {}).get("url") for model_id in catalogue.ids())  # no downloads
    for model_id in zoo_bundles:
        card = catalogue.get(model_id)
        assert card.is_bundle and card.bundle["name"] == model_id and card.licence
        assert_raises(ModelError, find_bundle_dir, card, search_dirs=[tmp_path],
                      match=f"python -m monai.bundle download {model_id}")


def test_shipped_default_models_load_verified_and_state_how_they_were_made():
    for model_id, real_case, min_validation in (("mir_abdomen_organs_unet", "TotalSegmentator", 0.5),
                                                ("mir_lung_nodule_retinanet", "LIDC", 0.1)):
        card = Catalogue().get(model_id)
        network = load_network(card)  # SHA-256 checked against the card
        assert sum(p.numel() for p in network.parameters()) > 100_000, model_id
        assert card.training["data"] and card.metrics["validation (best)"] > min_validation, model_id
        assert any(real_case in key for key in card.metrics), model_id  # measured on the real cases too


def test_local_weights_are_checked_against_sha256(tmp_path):
    sha256 = _save(_tiny_network().state_dict(), tmp_path / "tiny.pt")
    assert sha256 == hashlib.sha256((tmp_path / "tiny.pt").read_bytes()).hexdigest()
    card = ModelCard.from_dict(_entry(weights={"file": "tiny.pt", "sha256": sha256}), base_dir=tmp_path)
    assert resolve_weights(card, cache_dir=tmp_path / "cache") == tmp_path / "tiny.pt"

    wrong = ModelCard.from_dict(_entry(weights={"file": "tiny.pt", "sha256": "f" * 64}), base_dir=tmp_path)
    error = assert_raises(ModelError, resolve_weights, wrong, cache_dir=tmp_path / "cache", match="checksum")
    assert sha256 in str(error) and "f" * 64 in str(error)

    absent = ModelCard.from_dict(_entry(weights={"file": "absent.pt", "sha256": sha256}), base_dir=tmp_path)
    assert_raises(ModelError, resolve_weights, absent, cache_dir=tmp_path / "cache",
                  match=str(tmp_path / "absent.pt"))


def test_download_once_with_progress_then_from_cache(tmp_path):
    served = _served_file(tmp_path)
    cache = tmp_path / "cache"
    with _http_server(served.parent) as (base_url, requests):
        card = _download_card(f"{base_url}/{served.name}", sha256_of_file(served))
        fractions = []
        path = resolve_weights(card, cache_dir=cache, progress=Progress(lambda f, m: fractions.append(f)))
        assert path == cache / "tiny" / served.name and path.read_bytes() == served.read_bytes()
        assert len(fractions) > 3 and fractions == sorted(fractions) and fractions[-1] == 1.0
        assert 0.0 < fractions[1] < 1.0
        assert resolve_weights(card, cache_dir=cache) == path
        assert resolve_weights(card, cache_dir=cache, offline=True) == path
        assert requests == {f"/{served.name}": 1}

        path.write_bytes(b"damaged")
        assert_raises(ModelError, resolve_weights, card, cache_dir=cache, offline=True, match="damaged")
        assert resolve_weights(card, cache_dir=cache) == path
        assert path.read_bytes() == served.read_bytes() and requests == {f"/{served.name}": 2}
        assert sorted(p.name for p in path.parent.iterdir()) == [served.name]


def test_download_with_wrong_checksum_leaves_nothing(tmp_path):
    served = _served_file(tmp_path)
    expected = sha256_of_file(served)
    served.write_bytes(served.read_bytes()[:-1] + b"!")
    cache = tmp_path / "cache"
    with _http_server(served.parent) as (base_url, _):
        card = _download_card(f"{base_url}/{served.name}", expected)
        error = assert_raises(ModelError, resolve_weights, card, cache_dir=cache, match="checksum")
    assert expected in str(error) and sha256_of_file(served) in str(error)
    assert [p for p in cache.rglob("*") if p.is_file()] == []


def test_download_failures_name_the_url_and_where_to_put_the_file(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{closed_port}/weights.bin"
    card = _download_card(url, "a" * 64)
    expected_place = str(tmp_path / "cache" / "tiny" / "weights.bin")
    error = assert_raises(ModelError, resolve_weights, card, cache_dir=tmp_path / "cache", match=url)
    assert "no network?" in str(error) and expected_place in str(error)
    error = assert_raises(ModelError, resolve_weights, card, cache_dir=tmp_path / "cache", offline=True, match=url)
    assert expected_place in str(error)
    with _http_server(tmp_path) as (base_url, _):
        missing = _download_card(f"{base_url}/missing.bin", "a" * 64)
        assert_raises(ModelError, resolve_weights, missing, cache_dir=tmp_path / "cache", match="HTTP 404")
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_cancel_during_download_removes_the_part_file(tmp_path):
    served = _served_file(tmp_path)
    token = CancelToken()
    fractions = []

    def cancel_mid_file(fraction, message):
        fractions.append(fraction)
        if 0.0 < fraction < 1.0:
            token.cancel()

    with _http_server(served.parent) as (base_url, _):
        card = _download_card(f"{base_url}/{served.name}", sha256_of_file(served))
        assert_raises(Cancelled, resolve_weights, card, cache_dir=tmp_path / "cache",
                      progress=Progress(cancel_mid_file, token))
    assert 1.0 not in fractions
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


def test_load_network_unwraps_checkpoints_and_matches_the_saved_network(tmp_path):
    original = _tiny_network(seed=3)
    wrapped = {"state_dict": {f"module.{key}": value for key, value in original.state_dict().items()}, "epoch": 7}
    sha256 = _save(wrapped, tmp_path / "tiny.pt")
    card = ModelCard.from_dict(_entry(weights={"file": "tiny.pt", "sha256": sha256}), base_dir=tmp_path)
    fractions = []
    network = load_network(card, progress=Progress(lambda f, m: fractions.append(f)))
    assert not network.training and fractions[-1] == 1.0
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(network(image), original(image))


def test_corrupt_or_mismatched_weights_raise_model_error(tmp_path):
    truncated = tmp_path / "truncated.pt"
    _save(_tiny_network().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all" * 10)
    _save({"note": "no tensors here"}, tmp_path / "nontensor.pt")
    _save(_tiny_network(OTHER_UNET_ARGS).state_dict(), tmp_path / "other.pt")
    cases = [("truncated.pt", "truncated.pt"), ("garbage.pt", "garbage.pt"), ("nontensor.pt", "state dict"),
             ("other.pt", "do not match the architecture")]
    for file_name, message in cases:
        sha256 = sha256_of_file(tmp_path / file_name)
        card = ModelCard.from_dict(_entry(weights={"file": file_name, "sha256": sha256}), base_dir=tmp_path)
        error = assert_raises(ModelError, load_network, card, match=message)
        assert file_name in str(error)
    assert "different shape" in str(error) and "model.0.conv.weight" in str(error)


def test_build_architecture_refuses_what_is_not_a_network():
    cases = [({"name": "monai.networks.nets.os.system", "args": {}}, "cannot import"),
             ({"name": "monai.networks.nets.NoSuchNet", "args": {}}, "not a network class"),
             ({"name": "builtins.eval", "args": {}}, "allowed namespace"),
             ({"name": UNET, "args": {"spatial_dims": 3}}, "cannot be built")]
    for architecture, message in cases:
        assert_raises(ModelError, build_architecture, architecture, match=message)


def _write_bundle(folder, metadata_outputs=None, preprocessing=None, network=None, extra=None):
    """A bundle in the model zoo layout, shaped like spleen_ct_segmentation but tiny."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    outputs = metadata_outputs if metadata_outputs is not None else {
        "pred": {"type": "image", "format": "segmentation", "num_channels": 2,
                 "channel_def": {"0": "background", "1": "spleen"}}}
    metadata = {"version": "0.1.0", "name": "Tiny spleen", "description": "test bundle",
                "network_data_format": {"inputs": {"image": {"channel_def": {"0": "image"}}}, "outputs": outputs}}
    transforms = preprocessing if preprocessing is not None else [
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
        {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
        {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0], "mode": "bilinear"},
        {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164, "b_min": 0, "b_max": 1,
         "clip": True}]
    inference = {"imports": ["$import glob"], "bundle_root": ".",
                 "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
                 "network_def": network or dict(TINY_UNET_ARGS, _target_="UNet"),
                 "network": "$@network_def.to(@device)",
                 "preprocessing": {"_target_": "Compose", "transforms": transforms},
                 "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 1}}
    inference.update(extra or {})
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    return folder


def test_monai_bundle_gives_card_and_the_saved_network(tmp_path):
    bundle = _write_bundle(tmp_path / "tiny_spleen")
    original = _tiny_network(seed=5)
    torch.save(original.state_dict(), bundle / "models" / "model.pt")
    card, network = load_bundle(bundle)
    assert card.id == "tiny_spleen" and card.task == "segmentation" and card.labels == {1: "spleen"}
    assert card.spacing_mm == (1.5, 1.5, 2.0) and card.roi_size == (16, 16, 16)
    assert card.intensity == {"type": "window", "hu_min": -57, "hu_max": 164, "out_min": 0, "out_max": 1,
                              "clip": True}
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert not network.training and torch.equal(network(image), original(image))

    manifest = tmp_path / "user.json"
    manifest.write_text(json.dumps({"models": [
        {"id": "my_spleen", "title": "My spleen", "task": "segmentation", "labels": {"1": "Spleen"},
         "bundle": {"name": "spleen_ct_segmentation", "dir": "tiny_spleen"}, "licence": "Apache-2.0"}]}))
    entry = Catalogue([manifest]).get("my_spleen")
    resolved = resolve_card(entry)
    assert resolved.id == "my_spleen" and resolved.labels == {1: "Spleen"} and resolved.spacing_mm == (1.5, 1.5, 2.0)
    with torch.no_grad():
        assert torch.equal(load_network(entry)(image), original(image))


def test_torchscript_only_bundle_loads(tmp_path):
    bundle = _write_bundle(tmp_path / "scripted")
    original = _tiny_network(seed=6)
    image = torch.rand(1, 1, 16, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about shape checks; the tiny UNet has no data-dependent flow
        torch.jit.trace(original, image).save(str(bundle / "models" / "model.ts"))
    _, network = load_bundle(bundle)
    with torch.no_grad():
        assert torch.allclose(network(image), original(image), atol=1e-6)


def test_bundle_with_expressions_and_zscore_intensity(tmp_path):
    """Like wholeBody_ct_segmentation: pixdim is an expression, intensity is z-score then rescale to [-1, 1]."""
    transforms = [{"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim"},
                  {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
                  {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0}]
    extra = {"displayable_configs": {"highres": True}, "image_key": "image",
             "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]"}
    card = card_from_bundle(_write_bundle(tmp_path / "whole", preprocessing=transforms, extra=extra))
    assert card.spacing_mm == (1.5, 1.5, 1.5)
    assert card.intensity == {"type": "zscore", "nonzero": True, "out_min": -1.0, "out_max": 1.0}


def test_bundle_missing_pieces_are_named(tmp_path):
    no_metadata = _write_bundle(tmp_path / "no_metadata")
    (no_metadata / "configs" / "metadata.json").unlink()
    no_config = _write_bundle(tmp_path / "no_config")
    (no_config / "configs" / "inference.json").unlink()
    no_weights = _write_bundle(tmp_path / "no_weights")
    no_labels = _write_bundle(tmp_path / "no_labels", metadata_outputs={"pred": {"type": "object"}})
    no_window = _write_bundle(tmp_path / "no_window", preprocessing=[{"_target_": "LoadImaged", "keys": "image"}])
    cases = [(no_metadata, "configs/metadata.json"), (no_config, "configs/inference.json"),
             (no_weights, "model.pt"), (no_labels, "channel_def"), (no_window, "intensity")]
    for bundle, message in cases:
        assert_raises(ModelError, load_bundle, bundle, match=message)


def test_detection_bundle_without_torchvision_gives_a_clear_error(tmp_path):
    if importlib.util.find_spec("torchvision") is not None:
        raise unittest.SkipTest("torchvision is installed: the missing-package message cannot be provoked")
    detection = {
        "backbone": "$monai.networks.nets.resnet.resnet10(spatial_dims=3, n_input_channels=1)",
        "feature_extractor": "$monai.apps.detection.networks.retinanet_network.resnet_fpn_feature_extractor("
                             "@backbone, 3, False, [1, 2], None)"}
    network = {"_target_": "RetinaNet", "spatial_dims": 3, "num_classes": 1, "num_anchors": 3,
               "feature_extractor": "@feature_extractor", "size_divisible": [16, 16, 8]}
    bundle = _write_bundle(tmp_path / "detector", metadata_outputs={"pred": {"type": "object", "format": "dict"}},
                           network=network, extra=detection)
    torch.save({"weight": torch.zeros(1)}, bundle / "models" / "model.pt")
    entry = ModelCard.from_dict({"id": "nodules", "title": "Nodules", "task": "detection", "labels": {"0": "nodule"},
                                 "bundle": {"name": "detector", "dir": str(bundle)}, "licence": "Apache-2.0"})
    assert resolve_card(entry).task == "detection"
    assert_raises(ModelError, load_network, entry, match="needs the Python package 'torchvision'")


def _saved_card(folder, network, **changes):
    """A card whose weights are ``network``'s, saved in ``folder``."""
    sha256 = _save(network.state_dict(), folder / "tiny.pt")
    return ModelCard.from_dict(_entry(weights={"file": "tiny.pt", "sha256": sha256}, **changes), base_dir=folder)


def test_exported_bundle_reads_back_the_same_card_and_network(tmp_path):
    original = _tiny_network(seed=7)
    card = _saved_card(tmp_path, original, roi_size=[16, 16, 16], labels={"1": "liver"}, description="tiny test",
                       training={"data": "2 phantoms"}, metrics={"validation (best)": 0.75})
    bundle = export_bundle(card, tmp_path / "exported")
    back = card_from_bundle(bundle)
    assert (back.task, back.labels, back.spacing_mm, back.roi_size) == ("segmentation", {1: "liver"},
                                                                        (1.0, 1.0, 2.0), (16, 16, 16))
    assert back.intensity == card.intensity and back.title == card.title
    _, network = load_bundle(bundle)
    image = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(network(image), original(image))

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] == "0.1.0" and metadata["license"] == "Apache-2.0"
    assert metadata["authors"] == "MedicalImageRecognition"
    image_format = metadata["network_data_format"]["inputs"]["image"]
    assert (image_format["type"], image_format["format"], image_format["num_channels"],
            image_format["spatial_shape"]) == ("image", "hounsfield", 1, [16, 16, 16])
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "liver"}
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["network_def"]["_target_"] == UNET
    assert inference["inferer"] == {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16],
                                    "sw_batch_size": 1, "overlap": 0.25}
    readme = (bundle / "docs" / "README.md").read_text()
    assert "2 phantoms" in readme and "0.75" in readme and (bundle / "LICENSE").is_file()


def test_exported_zscore_intensity_reads_back(tmp_path):
    network = _tiny_network()
    for intensity in ({"type": "zscore", "nonzero": True}, {"type": "zscore", "nonzero": False, "out_min": -1.0,
                                                             "out_max": 1.0}):
        card = _saved_card(tmp_path, network, intensity=intensity, spacing_mm=None)
        bundle = export_bundle(card, tmp_path / f"zscore_{len(intensity)}")
        back = card_from_bundle(bundle)
        assert back.intensity == intensity and back.spacing_mm is None and back.roi_size is None


def test_exported_detector_reads_back(tmp_path):
    from RecognitionCore import networks

    architecture = networks.detector_architecture("tiny")
    torch.manual_seed(0)
    original = build_architecture(architecture).eval()
    card = _saved_card(tmp_path, original, task="detection", labels={"0": "nodule"}, architecture=architecture,
                       roi_size=[32, 32, 16])
    back, network = load_bundle(export_bundle(card, tmp_path / "detector"))
    assert (back.task, back.labels, back.roi_size, back.spacing_mm) == ("detection", {0: "nodule"}, (32, 32, 16),
                                                                        (1.0, 1.0, 2.0))
    assert type(network) is type(original)
    assert all(torch.equal(value, original.state_dict()[key]) for key, value in network.state_dict().items())


def test_shipped_default_model_exports_as_bundle(tmp_path):
    card = Catalogue().get("mir_abdomen_organs_unet")
    back = card_from_bundle(export_bundle(card, tmp_path / "mir_abdomen_organs_unet"))
    assert back.labels == card.labels and back.spacing_mm == card.spacing_mm and back.roi_size == card.roi_size
    assert back.intensity == card.intensity


def test_export_refuses_what_a_bundle_cannot_hold(tmp_path):
    entry = ModelCard.from_dict({"id": "spleen", "title": "Spleen", "task": "segmentation",
                                 "bundle": {"name": "spleen_ct_segmentation"}, "licence": "Apache-2.0"})
    assert_raises(ModelError, export_bundle, entry, tmp_path / "spleen", match="already the export")
    fixed_statistics = _saved_card(tmp_path, _tiny_network(), intensity={"type": "zscore", "mean": 40.0, "std": 300.0})
    assert_raises(ModelError, export_bundle, fixed_statistics, tmp_path / "fixed", match="['mean', 'std']")
    assert not (tmp_path / "spleen").exists() and not (tmp_path / "fixed").exists()


def test_exported_segmentation_bundle_runs_with_monai_bundle_run(tmp_path):
    """`monai.bundle run` (MONAI's own runner, with pytorch-ignite's evaluator) segments a NIfTI with the exported
    bundle's config and weights, as a user of the bundle would run it."""
    import nibabel
    import numpy
    from monai.bundle import run

    card = _saved_card(tmp_path, _tiny_network(seed=3), roi_size=[16, 16, 16])
    bundle = export_bundle(card, tmp_path / "runnable")
    (bundle / "data").mkdir()
    ct = numpy.random.default_rng(1).uniform(-200, 300, (22, 18, 14)).astype(numpy.float32)
    nibabel.save(nibabel.Nifti1Image(ct, numpy.diag([1.5, 1.5, 3.0, 1.0])), str(bundle / "data" / "case.nii.gz"))
    run(run_id="run", meta_file=str(bundle / "configs" / "metadata.json"),
        config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle))
    saved = nibabel.load(str(bundle / "eval" / "case_seg.nii.gz"))
    assert saved.shape[:3] == ct.shape and set(numpy.unique(numpy.asarray(saved.dataobj))) <= {0, 1}
    assert numpy.allclose(saved.affine, numpy.diag([1.5, 1.5, 3.0, 1.0]), atol=1e-4)  # back on the input grid
