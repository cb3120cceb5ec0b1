"""A device's own data from disk (every layout, every refusal), the tool that writes device
folders, and clients and server that run on folders instead of a global dataset."""

import gzip
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.common import Context, RecordDict
from helpers import federate, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from common.config import ConfigError
from common.data.datasets import DatasetFormatError, DatasetNotFoundError, ImageData, make_synthetic
from common.data.local import load_images, local_train_test, save_images
from common.runs import experiment
from common.runs.experiment import ClientData, DatasetSpec, client_data, server_data
from fedqssl_client.app import client_fn
from fedqssl_client.client import LowBitClient
from fedqssl_server.strategy import strategy_for

ROOT = Path(__file__).resolve().parents[1]
GREY = (1, 28, 10)  # channels, image size, classes of fashion-mnist / synthetic


def by_label(data: ImageData) -> ImageData:
    """``data`` in the order a class-folder walk returns it: by label, then by file index."""
    return data.subset(np.argsort(data.labels.numpy(), kind="stable"))


def assert_same(got: ImageData, want: ImageData) -> None:
    assert torch.equal(got.images, want.images)
    assert got.labelled == want.labelled
    if want.labelled:
        assert torch.equal(got.labels, want.labels)


@pytest.fixture(scope="module")
def sample() -> ImageData:
    return make_synthetic(60, seed=3)


def test_class_folders_of_png_round_trip_with_integer_labels(tmp_path, sample):
    save_images(sample, tmp_path / "device")
    assert sorted(p.name for p in (tmp_path / "device").iterdir()) == sorted(
        str(c) for c in sample.labels.unique().tolist()
    )
    assert_same(load_images(tmp_path / "device", *GREY), by_label(sample))


def test_flat_png_folder_and_npz_round_trip(tmp_path, sample):
    unlabelled = sample.without_labels()
    save_images(unlabelled, tmp_path / "flat")
    assert_same(load_images(tmp_path / "flat", *GREY), unlabelled)
    save_images(sample, tmp_path / "npz", "npz")
    assert_same(load_images(tmp_path / "npz", *GREY), sample)
    assert_same(load_images(tmp_path / "npz" / "data.npz", *GREY), sample)
    save_images(unlabelled, tmp_path / "npz-unlabelled", "npz")
    assert_same(load_images(tmp_path / "npz-unlabelled", *GREY), unlabelled)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_idx_pair_plain_or_gzipped_and_idx_images_alone(tmp_path, sample):
    images = sample.images[:, 0].numpy()
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", sample.labels.numpy())
    assert_same(load_images(tmp_path, *GREY), sample)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    assert not load_images(tmp_path, *GREY).labelled


@settings(max_examples=20, deadline=None)
@given(count=st.integers(1, 5), layout=st.sampled_from(["nhwc", "nchw"]), seed=st.integers(0, 99))
def test_npz_arrays_in_either_layout_and_rgb_become_the_runs_grey_nchw(
    tmp_path_factory, count, layout, seed
):
    rgb = np.random.default_rng(seed).integers(0, 256, (count, 28, 28, 3), dtype=np.uint8)
    stored = rgb if layout == "nhwc" else rgb.transpose(0, 3, 1, 2)
    folder = tmp_path_factory.mktemp("npz")
    np.savez(folder / "mine.npz", images=stored, labels=np.arange(count) % 10)
    loaded = load_images(folder, *GREY)
    grey = np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    assert loaded.images.shape == (count, 1, 28, 28)
    assert np.abs(loaded.images[:, 0].numpy().astype(int) - grey).max() <= 1
    assert loaded.labels.tolist() == (np.arange(count) % 10).tolist()
    assert load_images(folder, 3, 28, 10).images.permute(0, 2, 3, 1).numpy().tolist() == (
        rgb.tolist()
    )


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda d, s: (d / "cats").mkdir(), DatasetFormatError, "integer label"),
        (lambda d, s: None, DatasetNotFoundError, "holds no images"),
        (
            lambda d, s: np.savez(d / "x.npz", images=s.images.numpy()[:, :, :20, :20]),
            DatasetFormatError,
            "resize them to 28 x 28",
        ),
        (
            lambda d, s: np.savez(d / "x.npz", images=s.images.numpy(), labels=s.labels + 10),
            DatasetFormatError,
            r"labels must be in 0\.\.9",
        ),
        (
            lambda d, s: np.savez(d / "x.npz", images=s.images.numpy() / 255.0),
            DatasetFormatError,
            "uint8",
        ),
        (
            lambda d, s: np.savez(d / "x.npz", pictures=s.images.numpy()),
            DatasetFormatError,
            "no 'images' array",
        ),
    ],
)
def test_bad_local_data_is_refused_with_the_fix(tmp_path, sample, make, error, message):
    folder = tmp_path / "device"
    folder.mkdir()
    make(folder, sample)
    with pytest.raises(error, match=message):
        load_images(folder, *GREY)


def test_images_beside_class_folders_and_wrong_sized_pngs_are_refused(tmp_path, sample):
    save_images(sample.subset(np.arange(3)), tmp_path / "mixed")
    save_images(sample.subset(np.arange(2)).without_labels(), tmp_path / "flat")
    for png in (tmp_path / "flat").iterdir():
        png.rename(tmp_path / "mixed" / png.name)
    with pytest.raises(DatasetFormatError, match="both images and sub-folders"):
        load_images(tmp_path / "mixed", *GREY)
    save_images(sample.subset(np.arange(2)).without_labels(), tmp_path / "small")
    with pytest.raises(DatasetFormatError, match="resize the images to 32 x 32"):
        load_images(tmp_path / "small", 1, 32, 10)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        load_images(tmp_path / "nowhere", *GREY)
    with pytest.raises(FileExistsError, match="not empty"):
        save_images(sample, tmp_path / "small")


def test_held_out_split_is_stratified_disjoint_complete_and_seeded(tmp_path):
    data = make_synthetic(200, seed=5)
    save_images(data, tmp_path / "device", "npz")
    train, test = local_train_test(tmp_path / "device", *GREY, 0.25, [0, 1])
    again_train, _ = local_train_test(tmp_path / "device", *GREY, 0.25, [0, 1])
    other_train, _ = local_train_test(tmp_path / "device", *GREY, 0.25, [0, 2])
    assert len(train) + len(test) == 200
    rows = {tuple(image.flatten().tolist()) for image in data.images}
    split = [tuple(image.flatten().tolist()) for image in torch.cat([train.images, test.images])]
    assert set(split) == rows and len(set(split)) == 200  # disjoint and complete
    counts = np.bincount(data.labels.numpy(), minlength=10)
    assert np.bincount(test.labels.numpy(), minlength=10).tolist() == [
        round(0.25 * n) for n in counts
    ]
    assert torch.equal(train.images, again_train.images)
    assert not torch.equal(train.images, other_train.images)


def test_train_test_subfolders_are_used_as_given_and_unlabelled_data_has_no_test(tmp_path):
    data = make_synthetic(40, seed=6)
    save_images(data.subset(np.arange(30)), tmp_path / "own" / "train")
    save_images(data.subset(np.arange(30, 40)), tmp_path / "own" / "test")
    train, test = local_train_test(tmp_path / "own", *GREY, 0.2, 0)
    assert (len(train), len(test)) == (30, 10)
    save_images(data.without_labels(), tmp_path / "plain")
    train, test = local_train_test(tmp_path / "plain", *GREY, 0.2, 0)
    assert len(train) == 40 and test is None
    save_images(make_synthetic(2, seed=7), tmp_path / "tiny")
    with pytest.raises(DatasetFormatError, match="no train/test split"):
        local_train_test(tmp_path / "tiny", *GREY, 0.2, 0)


@pytest.fixture(scope="module")
def device_folders(tmp_path_factory) -> Path:
    """What ``scripts/make_device_data.py`` writes for 3 synthetic devices."""
    out = tmp_path_factory.mktemp("devices")
    subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "make_device_data.py"), str(out),
            "--dataset", "synthetic", "--num-devices", "3", "--beta", "0.5",
            "--max-samples", "80", "--buffer-ratio", "0.1", "--probe-samples", "200",
            "--test-samples", "100",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def test_the_tool_writes_each_devices_dirichlet_share_and_the_servers_folders(device_folders):
    spec = DatasetSpec.of("synthetic")
    shares = [load_images(device_folders / f"device-{k}", *spec.shape) for k in range(3)]
    assert [len(s) for s in shares] == [80, 80, 80]
    histograms = np.array([np.bincount(s.labels.numpy(), minlength=10) for s in shares])
    assert (histograms.max(axis=0) > histograms.min(axis=0) + 5).any()  # skewed, not iid
    rows = [{tuple(i.flatten().tolist()) for i in s.images} for s in shares]
    assert not (rows[0] & rows[1]) and not (rows[1] & rows[2])  # disjoint shares
    buffer = load_images(device_folders / "server" / "buffer", *spec.shape)
    assert not buffer.labelled and len(buffer) == pytest.approx(100, abs=5)
    train, test = local_train_test(device_folders / "server" / "probe", *spec.shape, 0.2, 0)
    assert len(train) == pytest.approx(200, abs=10) and len(test) == pytest.approx(100, abs=5)


def test_a_node_with_local_data_never_loads_the_global_dataset(device_folders, monkeypatch):
    def refuse(*_):
        raise AssertionError("the global dataset was loaded")

    monkeypatch.setattr(experiment, "experiment_data", refuse)
    config = tiny_config(
        device_folders,
        "fedqssl",
        "4,8,4",
        **{
            "num-clients": 3,
            "buffer-dir": str(device_folders / "server" / "buffer"),
            "probe-dir": str(device_folders / "server" / "probe"),
        },
    )
    client = client_fn(
        Context(
            run_id=1,
            node_id=1,
            node_config={
                "partition-id": 1,
                "bitwidth": 8,
                "local-data": str(device_folders / "device-1"),
            },
            state=RecordDict(),
            run_config=config.to_run_config(),
        )
    )
    own = client.numpy_client.data
    assert client.numpy_client.bits == 8 and len(own.train) + len(own.test) == 80
    assert len(server_data(config).buffer) == pytest.approx(100, abs=5)


def test_devices_on_their_own_folders_federate_and_an_unlabelled_one_is_not_scored(
    device_folders, tmp_path
):
    config = tiny_config(
        tmp_path,
        "fedqssl",
        "4,8",
        **{
            "buffer-dir": str(device_folders / "server" / "buffer"),
            "probe-dir": str(device_folders / "server" / "probe"),
        },
    )
    spec = DatasetSpec.of("synthetic")
    labelled = client_data(config, 0, str(device_folders / "device-0"))
    unlabelled_share = load_images(device_folders / "device-1", *spec.shape).without_labels()
    unlabelled = ClientData(spec, unlabelled_share, None)
    strategy, _ = federate(config, [labelled, unlabelled])
    summary = json.loads((Path(config.output_dir) / "summary.json").read_text())
    first, second = summary["local-accuracy"]
    assert first["test-examples"] == len(labelled.test) and 0 <= first["local-accuracy"] <= 1
    assert second["test-examples"] == 0 and second["local-accuracy"] is None
    assert second["local-model"] == "unlabelled"
    assert summary["mean-local-accuracy"] == first["local-accuracy"]  # the unscored one is out
    examples = [c["examples"] for c in strategy.recorder.rounds[-1]["clients"]]
    assert examples == [len(labelled.train), 80]  # folders used whole, no cap, no partition
    assert len(strategy.data.probe_test) == pytest.approx(100, abs=5)


def test_a_supervised_algorithm_refuses_a_device_without_labels(tmp_path):
    config = tiny_config(tmp_path, "fedavg")
    data = ClientData(DatasetSpec.of("synthetic"), make_synthetic(20), None)
    unlabelled = ClientData(data.spec, data.train.without_labels(), None)
    with pytest.raises(ConfigError, match="fedavg trains on labels"):
        LowBitClient(config, 0, 4, RecordDict(), unlabelled)


def test_a_probe_folder_missing_a_scored_class_or_a_test_split_is_refused(tmp_path):
    data = make_synthetic(60, seed=3)
    keep = data.labels != 7
    train = ImageData(data.images[keep], data.labels[keep], 10)
    save_images(train, tmp_path / "probe" / "train")
    save_images(data, tmp_path / "probe" / "test")  # class 7 scored, never seen in train
    config = tiny_config(tmp_path, "fedsimclr", **{"probe-dir": str(tmp_path / "probe")})
    with pytest.raises(DatasetFormatError, match=r"classes \[7\] are in the test split"):
        server_data(config)


@pytest.mark.parametrize("algorithm", ["fedqssl", "fedsimclr"])
def test_a_buffer_folder_of_one_image_is_refused_at_start(tmp_path, algorithm):
    save_images(make_synthetic(1).without_labels(), tmp_path / "buffer")
    extra = {"buffer-dir": str(tmp_path / "buffer")}
    if algorithm == "fedsimclr":
        extra["bn-recalibrate"] = "global"  # the only use an averaging server has for D_g
    config = tiny_config(tmp_path, algorithm, **extra)
    with pytest.raises(ConfigError, match=r"1 image\(s\).*buffer-dir"):
        strategy_for(config, server_data(config))


def labelled_folder(folder: Path, count: int = 10) -> ImageData:
    data = make_synthetic(count, seed=5)
    save_images(data, folder)
    return data


def test_a_link_to_a_folder_is_refused_never_followed(tmp_path):
    labelled_folder(tmp_path / "device")
    first_class = next(p for p in sorted((tmp_path / "device").iterdir()) if p.is_dir())
    (first_class / "again").symlink_to(".")  # a loop: read 41 times, or forever, if followed
    with pytest.raises(DatasetFormatError, match=r"again is a link to a folder"):
        load_images(tmp_path / "device", 1, 28, 10)
    (first_class / "again").unlink()
    (tmp_path / "device" / "7").rename(tmp_path / "seven")
    (tmp_path / "device" / "7").symlink_to(tmp_path / "seven")
    with pytest.raises(DatasetFormatError, match=r"7 is a link to a folder"):
        load_images(tmp_path / "device", 1, 28, 10)


def test_a_file_linked_twice_is_refused_not_read_into_both_splits(tmp_path):
    labelled_folder(tmp_path / "device")
    first_class = next(p for p in sorted((tmp_path / "device").iterdir()) if p.is_dir())
    image = next(first_class.glob("*.png"))
    (first_class / "copy.png").symlink_to(image)
    with pytest.raises(DatasetFormatError, match=r"copy.png is the same image as"):
        load_images(tmp_path / "device", 1, 28, 10)


def test_sixteen_bit_greyscale_keeps_its_values(tmp_path):
    from PIL import Image

    values = ((np.arange(28 * 28, dtype=np.int64).reshape(28, 28) * 83) % 65536).astype(np.uint16)
    (tmp_path / "flat").mkdir()
    Image.fromarray(values.astype(np.uint16)).save(tmp_path / "flat" / "deep.png")
    assert Image.open(tmp_path / "flat" / "deep.png").mode.startswith("I;16")
    loaded = load_images(tmp_path / "flat", 1, 28, 10).images[0, 0].numpy()
    assert np.array_equal(loaded, (values >> 8).astype(np.uint8))  # not 255 everywhere


def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    from PIL import Image

    (tmp_path / "flat").mkdir()
    Image.new("L", (12000, 12000)).save(tmp_path / "flat" / "bomb.png")  # ~0.4 MB on disk
    with pytest.raises(DatasetFormatError, match=r"bomb.png: 12000 x 12000 pixels"):
        load_images(tmp_path / "flat", 1, 28, 10)


@pytest.mark.parametrize("damage", ["object", "truncated", "raw-images", "raw-labels"])
def test_an_unreadable_npz_is_refused_naming_it(tmp_path, damage):
    path = tmp_path / "data.npz"
    if damage == "object":
        np.savez(path, images=np.array([{"a": 1}], dtype=object))
    elif damage.startswith("raw-"):  # a member without its .npy header reads back as bytes
        with zipfile.ZipFile(path, "w") as archive:
            for name in ("images", "labels"):
                if name == damage[4:]:
                    archive.writestr(f"{name}.npy", b"raw bytes")
                else:
                    buffer = io.BytesIO()
                    np.save(buffer, np.zeros((4, 28, 28) if name == "images" else 4, np.uint8))
                    archive.writestr(f"{name}.npy", buffer.getvalue())
    else:
        np.savez(path, images=np.zeros((4, 28, 28), np.uint8))
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DatasetFormatError, match=r"data.npz: not a readable .npz"):
        load_images(path, 1, 28, 10)


def test_idx_files_are_read_only_as_far_as_their_header_promises(tmp_path):
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    (tmp_path / "padded").mkdir()
    with gzip.open(tmp_path / "padded" / "padded-images-idx3-ubyte.gz", "wb") as handle:
        handle.write(header + bytes(10 * 28 * 28) + bytes(10_000_000))  # 10 MB of extra zeros
    with pytest.raises(DatasetFormatError, match=r"promises 7840 bytes .* file has more"):
        load_images(tmp_path / "padded", 1, 28, 10)
    huge = bytes([0, 0, 8, 3]) + (2**32 - 1).to_bytes(4, "big") * 3  # wraps an int64 product
    (tmp_path / "huge").mkdir()
    (tmp_path / "huge" / "huge-images-idx3-ubyte").write_bytes(huge)
    with pytest.raises(DatasetFormatError, match=r"more than the 1073741824 bytes"):
        load_images(tmp_path / "huge", 1, 28, 10)


def test_a_device_with_fewer_than_two_training_images_is_refused_at_load(tmp_path):
    save_images(make_synthetic(1).without_labels(), tmp_path / "one")
    config = tiny_config(tmp_path, "fedqssl")
    with pytest.raises(DatasetFormatError, match=r"1 training image\(s\); a device needs at least"):
        client_data(config, 0, str(tmp_path / "one"))


def test_zero_images_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "empty.npz"
    np.savez(path, images=np.zeros((0, 28, 28), np.uint8), labels=np.zeros(0, np.int64))
    with pytest.raises(DatasetNotFoundError, match=r"empty.npz holds 0 images"):
        load_images(path, 1, 28, 10)


def test_an_empty_class_folder_beside_the_others_is_named_in_a_warning(tmp_path, caplog):
    folder = tmp_path / "device"
    (folder / "0").mkdir(parents=True)
    (folder / "7").mkdir()
    for index in range(2):
        Image.fromarray(np.full((28, 28), 40 * index, np.uint8)).save(folder / "0" / f"{index}.png")
    with caplog.at_level("WARNING"):
        data = load_images(folder, 1, 28, 10)
    assert len(data) == 2 and data.labels.tolist() == [0, 0]
    assert "class folder(s) 7 hold no image" in caplog.text and str(folder) in caplog.text
