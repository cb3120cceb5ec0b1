"""A run keeps what it trained: the global model and every downlink saved in its folder without
pickle, named in the summary, and loaded back as the same model (issue 24, part 1)."""

import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import federate, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.data.local import save_images
from common.learning.models import extract_features
from common.runs.experiment import server_data
from common.runs.saved_models import SavedModelError, load_model, load_probe, read_payload
from common.wire.payload import decode_state, payload_bits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import use_model


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("run"), "fedqssl")
    strategy, _ = federate(config)
    return Path(config.output_dir), config, strategy


def test_the_summary_names_every_saved_model_and_each_is_what_the_server_held(finished_run):
    run, _, strategy = finished_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["models"] == {
        "global": "models/global.npz",
        "downlink-4bit": "models/downlink-4bit.npz",
        "downlink-8bit": "models/downlink-8bit.npz",
    }
    saved_global = decode_state(read_payload(run / summary["models"]["global"]))
    assert all(torch.equal(saved_global[k], v) for k, v in strategy.global_state.items())
    for bits in (4, 8):
        payload = read_payload(run / summary["models"][f"downlink-{bits}bit"])
        assert payload_bits(payload) == bits  # packed codes, as sent
        sent = strategy.downlink[bits]
        assert all(np.array_equal(a, b) for a, b in zip(payload, sent, strict=True))


def test_a_loaded_model_runs_at_its_bitwidth_and_scores_as_the_summary_says(finished_run):
    run, config, _ = finished_run
    summary = json.loads((run / "summary.json").read_text())
    scores = use_model.score(run)
    assert scores["global-probe-accuracy"] == summary["global-probe-accuracy"]
    assert scores["knn-accuracy"] == summary["knn-accuracy"]
    low_bit = load_model(run / "models/downlink-4bit.npz", config)
    assert low_bit.encoder.features[0].bits == 4 and not low_bit.training


def test_embedding_a_folder_of_images_uses_the_saved_encoder(finished_run, tmp_path):
    run, config, strategy = finished_run
    probe = server_data(config).probe_test
    images = type(probe)(probe.images[:12], probe.labels[:12], probe.num_classes)
    save_images(images, tmp_path / "images")
    out = tmp_path / "features.npy"
    assert use_model.main([str(run), "--embed", str(tmp_path / "images"), "--out", str(out)]) == 0
    features = np.load(out)
    model = strategy.monitor.model_of(strategy.global_state)
    spec = strategy.data.spec
    # the class-folder layout reads images back grouped by class: compare as sets of rows
    expected = extract_features(model.encoder, spec.normalize(images.images)).numpy()
    assert features.shape == expected.shape
    assert np.allclose(np.sort(features, axis=0), np.sort(expected, axis=0), atol=1e-5)


def test_a_file_that_is_not_a_saved_model_is_refused_naming_it(tmp_path, finished_run):
    run = finished_run[0]
    garbage = tmp_path / "model.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(SavedModelError, match=r"model\.npz is not a saved fedqssl model"):
        read_payload(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, header=np.array([{"a": 1}], dtype=object), codes=[], floats=[], ints=[])
    with pytest.raises(SavedModelError, match=r"pickled\.npz"):
        read_payload(pickled)
    other = tiny_config(tmp_path, "fedqssl", **{"model-width": 4})
    with pytest.raises(SavedModelError, match="does not fit this run's model"):
        load_model(run / "models/global.npz", other)
    with pytest.raises(SystemExit, match="no saved model 'downlink-2bit'; it has: downlink-4bit"):
        use_model.score(run, "downlink-2bit")


def test_each_device_keeps_its_personalized_model_and_probe_in_the_run_folder(tmp_path):
    """In simulation the run folder is on the devices' machine: each keeps its model (at its
    bitwidth) and its local probe head there; the summary names them by relative paths."""
    config = tiny_config(tmp_path, "fedsimclr")
    folder = Path(config.output_dir)
    folder.mkdir(parents=True)
    models = str(folder / "models")
    data = [None, None]
    strategy, clients = federate(config, data, model_dirs=[models, models])
    summary = json.loads((folder / "summary.json").read_text())
    for client, bits in zip(summary["local-accuracy"], (4, 8), strict=True):
        k = client["partition-id"]
        assert client["saved-model"] == summary["models"][f"client-{k}"] == f"models/client-{k}.npz"
        model = load_model(folder / client["saved-model"], config)
        assert model.encoder.features[0].bits == bits
        received = decode_state(strategy.downlink[bits])
        assert all(torch.equal(model.state_dict()[n].cpu(), v) for n, v in received.items())
        probe = load_probe(folder / client["saved-model"])
        own = clients[str(k)]
        test = own.data.test
        features = extract_features(model.encoder, own.data.spec.normalize(test.images))
        assert probe.accuracy(features, test.labels) == pytest.approx(client["local-accuracy"])
    assert "/" not in json.dumps(summary["models"]).replace("models/", "")  # no machine path


def test_a_device_without_a_model_folder_keeps_nothing(tmp_path):
    config = tiny_config(tmp_path, "fedsimclr")
    federate(config)
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    assert all(c["saved-model"] is None for c in summary["local-accuracy"])
    assert not any(key.startswith("client-") for key in summary["models"])


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_a_mutated_saved_model_loads_or_is_refused_naming_it(tmp_path_factory, finished_run, data):
    """Mutated copies of a real ``models/*.npz`` (bytes flipped, cut, a member replaced by raw
    bytes, JSON or another array): ``load_model`` gives a model or a ``SavedModelError`` naming
    the file, never another exception."""
    run, config, _ = finished_run
    original = run / "models" / data.draw(st.sampled_from(["global.npz", "downlink-4bit.npz"]))
    path = tmp_path_factory.mktemp("mutated") / "model.npz"
    blob = bytearray(original.read_bytes())
    kind = data.draw(st.sampled_from(["flip", "cut", "raw-member", "json-member", "array"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] ^= data.draw(st.integers(1, 255))
        path.write_bytes(bytes(blob))
    elif kind == "cut":
        path.write_bytes(bytes(blob[: data.draw(st.integers(0, len(blob) - 1))]))
    else:
        member = data.draw(st.sampled_from(["header", "codes", "floats", "ints"]))
        with np.load(original, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
        if kind == "array":
            shape = data.draw(st.lists(st.integers(0, 5), max_size=2))
            dtype = data.draw(st.sampled_from([np.uint8, np.int64, np.float32, np.float64]))
            size = int(np.prod(shape))
            values = data.draw(st.lists(st.integers(-3, 300), min_size=size, max_size=size))
            arrays[member] = np.asarray(values).astype(dtype).reshape(shape)
            np.savez(path, **arrays)
        else:
            raw = b"raw bytes" if kind == "raw-member" else json.dumps({"bits": 2}).encode()
            with zipfile.ZipFile(path, "w") as archive:  # the member without its .npy header
                for key, array in arrays.items():
                    if key != member:
                        buffer = io.BytesIO()
                        np.save(buffer, array)
                        archive.writestr(f"{key}.npy", buffer.getvalue())
                archive.writestr(f"{member}.npy", raw)
    try:
        assert isinstance(load_model(path, config), torch.nn.Module)
    except SavedModelError as error:
        assert str(path) in str(error)
