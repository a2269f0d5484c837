"""Model kinds load and predict: torchvision + file / s3 weights, sha256 pins, TorchScript,
entrypoints, fine-tuned heads with labels files; labels and preprocessing resolution."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from vision_ops.config import Preprocessing, parse_spec
from vision_ops.errors import ModelError
from vision_ops.models import (
    MODEL_KINDS,
    check_model,
    load_labels,
    load_model,
    resolve_labels,
    resolve_preprocessing,
    state_dict_sha256,
)
from vision_ops.predictors import Classifier, stack_on_device
from vision_ops.schema import (
    STATUS_ERROR,
    STATUS_OK,
    TOP_K_IDS,
    TOP_K_SCORES,
    classification_table,
)

PREP = {"resize": 72, "crop": 64, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
CLASSES = 6


def tiny_classifier(num_classes: int = CLASSES) -> torch.nn.Module:
    """A small torchvision model with seeded, well-spread logits (distinct top-k)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=num_classes)
    head = model.classifier[-1]
    torch.nn.init.normal_(head.weight, std=1.0)
    torch.nn.init.normal_(head.bias, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def reference() -> torch.nn.Module:
    return tiny_classifier()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory, reference: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("weights") / "mobilenet_finetuned.pt"
    torch.save({"state_dict": reference.state_dict(), "epoch": 3}, path)
    return path


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)


def direct_logits(module: torch.nn.Module, images: np.ndarray) -> torch.Tensor:
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(PREP["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREP["std"]).view(1, 3, 1, 1)
    with torch.inference_mode():
        return module((pixels - mean) / std)


BASE = {"input": {"uris": ["/nowhere"]}, "output": {"uri": "/tmp/unused"}}


def spec_for(model: dict, **task: object) -> object:
    return parse_spec(
        {
            **BASE,
            "task": {"kind": "classification", **task},
            "model": {"preprocessing": PREP, **model},
        }
    )


def torchvision_file_model(path: object, **extra: object) -> dict:
    return {
        "architecture": "mobilenet_v3_small",
        "weights": str(path),
        "num_classes": CLASSES,
    } | extra


def assert_predicts_like(spec: object, reference: torch.nn.Module, images: np.ndarray) -> None:
    classifier = Classifier(spec)  # type: ignore[arg-type]
    assert classifier.spec.runtime.batch_size == 8  # unsized: a CPU actor's batch
    ids, scores = classifier.predict(images)
    expected = direct_logits(reference, images).softmax(-1).topk(classifier.top_k)
    np.testing.assert_array_equal(ids, expected.indices.numpy())
    np.testing.assert_allclose(scores, expected.values.numpy(), atol=1e-5)


def test_every_model_kind_is_registered() -> None:
    from vision_ops.config import EntrypointModel, OnnxModel, TorchScriptModel, TorchvisionModel

    specs = (EntrypointModel, OnnxModel, TorchScriptModel, TorchvisionModel)
    kinds = sorted(spec.model_fields["kind"].default for spec in specs)
    assert MODEL_KINDS.names() == kinds == ["entrypoint", "onnx", "torchscript", "torchvision"]


def test_torchvision_with_local_state_dict_file(reference, weights_file, images) -> None:
    spec = spec_for(torchvision_file_model(weights_file), top_k=3)
    loaded = load_model(spec.model)
    assert loaded.name == "mobilenet_v3_small"
    assert loaded.weights_sha256 == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert_predicts_like(spec, reference, images)


@pytest.mark.s3
def test_torchvision_with_s3_state_dict(reference, weights_file, images, s3fs_client, s3_options):
    s3fs_client.put_file(str(weights_file), "models/finetuned/mobilenet.pt")
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    model = torchvision_file_model("s3://models/finetuned/mobilenet.pt", weights_sha256=digest)
    spec = spec_for(model, top_k=2).model_copy(update={"storage_options": s3_options})
    assert load_model(spec.model, s3_options).weights_sha256 == digest
    assert_predicts_like(spec, reference, images)


def test_sha256_mismatch_is_refused(weights_file) -> None:
    wrong = "0" * 64
    spec = spec_for(torchvision_file_model(weights_file, weights_sha256=wrong))
    with pytest.raises(ModelError) as err:
        load_model(spec.model)
    actual = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert f"the spec pins {wrong}, the file has {actual}" in str(err.value)


def test_weights_that_do_not_fit_the_architecture(weights_file) -> None:
    spec = spec_for(torchvision_file_model(weights_file, num_classes=CLASSES + 1))
    with pytest.raises(ModelError, match="do not fit the architecture") as refused:
        load_model(spec.model)
    message = str(refused.value)  # one line naming the tensors, not torch's header alone
    assert "\n" not in message and message.endswith("set model.num_classes to the weights'")
    head = "size mismatch for classifier.3.weight: copying a param with shape"
    found = f"{head} torch.Size([{CLASSES}, 1024]) from checkpoint"
    assert found in message


def test_weights_of_another_layer_width_get_no_num_classes_hint(tmp_path) -> None:
    """A convolution of another width is no head of another size: the tensors are named,
    num_classes is not suggested (it was for any size mismatch)."""
    from vision_ops.models import load_state_dict_file

    path = tmp_path / "narrow.pt"
    torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)).state_dict(), path)
    with pytest.raises(ModelError) as refused:
        load_state_dict_file(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)), str(path), None, {})
    message = str(refused.value)
    assert "size mismatch for 0.weight" in message and "num_classes" not in message


def test_torchscript_file(tmp_path, reference, images) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(reference).save(str(path))
    spec = spec_for({"kind": "torchscript", "uri": str(path)}, top_k=4)
    loaded = load_model(spec.model)
    assert loaded.name == "scripted"
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_predicts_like(spec, reference, images)


def test_entrypoint_with_state_dict(tmp_path, images) -> None:
    from vision_ops.zoo import efficientnet_lite0

    torch.manual_seed(3)
    reference = efficientnet_lite0(pretrained=False, num_classes=CLASSES).eval()
    path = tmp_path / "lite0_head.pt"
    torch.save(reference.state_dict(), path)
    model = {
        "kind": "entrypoint",
        "entrypoint": "vision_ops.zoo:efficientnet_lite0",
        "kwargs": {"pretrained": False, "num_classes": CLASSES},
        "weights": str(path),
    }
    spec = spec_for(model, top_k=2)
    assert load_model(spec.model).name == "efficientnet_lite0"
    assert_predicts_like(spec, reference, images)


def test_entrypoint_pretrained_weights_from_package_are_real() -> None:
    from vision_ops.zoo import efficientnet_lite0

    model = efficientnet_lite0().eval()
    spec = spec_for({"kind": "entrypoint", "entrypoint": "vision_ops.zoo:efficientnet_lite0"})
    loaded = load_model(spec.model)
    assert loaded.weights_sha256 == state_dict_sha256(model)
    assert loaded.module.state_dict()["_fc.weight"].shape == (1000, 1280)


def test_fine_tuned_head_with_labels_file(tmp_path, weights_file, images) -> None:
    names = ["road", "river", "forest", "field", "roof", "car"]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    spec = spec_for(torchvision_file_model(weights_file, labels=str(tmp_path / "labels.txt")))
    classifier = Classifier(spec)
    batch = {"source_uri": np.array(list("abcd"), dtype=object), "image": images}
    batch["status"] = np.array([STATUS_OK] * 4, dtype=object)
    rows = classification_table(classifier(batch), "run-1", classifier.model.labels).to_pylist()
    ids, scores = classifier.predict(images)
    assert [row["label"] for row in rows] == [names[i] for i in ids[:, 0]]
    assert [[e["label"] for e in row["top_k"]] for row in rows] == [
        [names[i] for i in row] for row in ids
    ]
    assert [row["score"] for row in rows] == pytest.approx(scores[:, 0].tolist(), abs=1e-6)


def test_json_labels_list_and_map(tmp_path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(["a", "b"]))
    (tmp_path / "map.json").write_text(json.dumps({"0": "zero", "2": "two"}))
    assert load_labels(str(tmp_path / "list.json")) == ["a", "b"]
    assert load_labels(str(tmp_path / "map.json")) == ["zero", "1", "two"]
    assert load_labels("imagenet-1k")[281] == "tabby"


def test_an_image_the_model_scores_nan_is_an_error_row_not_an_ok_row() -> None:
    """NaN logits for one image of a batch (an overflow in float16): that row is an error
    row naming why, its task columns null; the others keep their predictions."""
    spec = spec_for(
        {"kind": "entrypoint", "entrypoint": "toy_models:nan_on_black",
         "preprocessing": {"resize": 8, "crop": 8, "mean": [0.0] * 3, "std": [1.0] * 3}},
        top_k=2,
    )  # fmt: skip
    classifier = Classifier(spec)  # type: ignore[arg-type]
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[0, ..., 0], images[2, ..., 2] = 200, 90  # red, black, blue
    batch = {"source_uri": np.array(list("abc"), dtype=object), "image": images}
    batch["status"] = np.array([STATUS_OK] * 3, dtype=object)
    rows = classification_table(classifier(batch), "run-1", None).to_pylist()
    assert [row["status"] for row in rows] == [STATUS_OK, STATUS_ERROR, STATUS_OK]
    assert rows[1]["error_type"] == "NonFiniteOutput"
    assert "holds NaN or infinity" in rows[1]["error_message"]
    assert (rows[1]["score"], rows[1]["label_id"], rows[1]["top_k"]) == (None, None, None)
    assert [rows[0]["label_id"], rows[2]["label_id"]] == [0, 2]
    assert all(np.isfinite(rows[i]["score"]) for i in (0, 2))


def test_a_mask_of_nan_logits_is_an_error_row_not_a_mask() -> None:
    """A segmenter's NaN logits for one image: its argmax would be a mask of class 0, an ok
    row; it is an error row (NonFiniteOutput), and the other image keeps its mask."""
    from vision_ops.predictors import Segmenter
    from vision_ops.schema import SEGMENT_FRACTIONS

    spec = parse_spec({
        **BASE,
        "task": {"kind": "segmentation"},
        "model": {"kind": "entrypoint", "entrypoint": "toy_models:nan_segmenter_on_black",
                  "preprocessing": {"resize": 8, "crop": 8, "mean": [0.0] * 3, "std": [1.0] * 3}},
    })  # fmt: skip
    segmenter = Segmenter(spec)
    images = np.zeros((2, 8, 8, 3), np.uint8)
    images[1, ..., 0] = 200  # black, red
    batch = {"source_uri": np.array(["a", "b"], dtype=object), "image": images}
    batch["status"] = np.array([STATUS_OK] * 2, dtype=object)
    out = segmenter(batch)
    assert list(out["status"]) == [STATUS_ERROR, STATUS_OK]
    assert out["error_type"][0] == "NonFiniteOutput"
    assert out[SEGMENT_FRACTIONS][1].tolist() == [[1.0, 1.0]]  # all red


def test_too_few_labels_for_the_head_is_refused(tmp_path, weights_file) -> None:
    (tmp_path / "labels.txt").write_text("only\ntwo\n")
    spec = spec_for(torchvision_file_model(weights_file, labels=str(tmp_path / "labels.txt")))
    with pytest.raises(ModelError, match="the model has 6 outputs, found only 2 labels"):
        Classifier(spec)


def test_host_images_stack_into_one_new_batch() -> None:
    """Read-only arrays, as Ray's object store hands them, become one new uint8 batch."""
    rng = np.random.default_rng(0)
    images = [rng.integers(1, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    for image in images:
        image.flags.writeable = False
    batch = stack_on_device(images, torch.device("cpu"))
    assert batch.dtype == torch.uint8 and tuple(batch.shape) == (3, 4, 5, 3)
    np.testing.assert_array_equal(batch.numpy(), np.stack(images))
    batch[0] = 0
    assert images[0].all()  # the batch is a copy


def test_error_rows_pass_the_predictor_untouched(weights_file, images) -> None:
    classifier = Classifier(spec_for(torchvision_file_model(weights_file), top_k=2))
    status = np.array([STATUS_OK, STATUS_ERROR, STATUS_OK, STATUS_ERROR], dtype=object)
    out = classifier({"status": status, "image": images, "source_uri": np.arange(4)})
    assert "image" not in out
    np.testing.assert_array_equal(out[TOP_K_IDS][[1, 3]], -1)
    assert np.isnan(out[TOP_K_SCORES][[1, 3]]).all()
    ids, scores = classifier.predict(images[[0, 2]])
    np.testing.assert_array_equal(out[TOP_K_IDS][[0, 2]], ids)
    np.testing.assert_allclose(out[TOP_K_SCORES][[0, 2]], scores, atol=1e-6)
    assert list(out["model_name"]) == ["mobilenet_v3_small"] * 4


def test_top_k_is_capped_at_the_number_of_classes(weights_file) -> None:
    assert Classifier(spec_for(torchvision_file_model(weights_file), top_k=50)).top_k == CLASSES


def test_weights_enum_gives_preprocessing_and_labels_without_download() -> None:
    spec = spec_for({"architecture": "resnet50", "weights": "IMAGENET1K_V2"})
    spec = spec.model_copy(update={"model": spec.model.model_copy(update={"preprocessing": None})})
    assert resolve_preprocessing(spec.model) == Preprocessing(
        resize=232, crop=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)
    )
    labels = resolve_labels(spec.model)
    assert labels is not None and len(labels) == 1000 and labels[0] == "tench"


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"architecture": "resnet5O"}, "expected a torchvision classification model"),
        ({"architecture": "resnet50", "weights": "IMAGENET9K"}, "has no weights 'IMAGENET9K'"),
        ({"kind": "entrypoint", "entrypoint": "no_such_pkg.mod:fn"}, "cannot import"),
        ({"kind": "onnx", "uri": "/m.onnx"}, "^model.kind onnx: ONNX models run as detectors"),
    ],
)
def test_check_model_names_the_mistake(model: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        check_model(spec_for(model).model)


def test_a_keyword_the_architecture_does_not_take_is_refused_before_any_work() -> None:
    """Checked by building the architecture on the meta device (no memory, no weights), so a
    typo in model.kwargs fails `validate` and the run before Ray starts, not in each actor."""
    model = {"architecture": "resnet18", "kwargs": {"foo": {"bar": 1}}}
    with pytest.raises(ModelError, match=r"^model.kwargs: .*unexpected keyword argument 'foo'"):
        check_model(spec_for(model).model)
    with pytest.raises(ModelError, match=r"^model.kwargs: .*unexpected keyword argument 'foo'"):
        load_model(spec_for(model).model)
    taken = {"architecture": "resnet18", "num_classes": 3, "kwargs": {"num_classes": 3}}
    with pytest.raises(ModelError, match=r"^model.kwargs: num_classes is set by the job"):
        check_model(spec_for(taken).model)
    check_model(
        spec_for({"architecture": "resnet18", "kwargs": {"zero_init_residual": True}}).model
    )
    # with a weights enum the keywords given win over the job's own (the real build's rule)
    enum = {"architecture": "deeplabv3_mobilenet_v3_large", "weights": "DEFAULT"}
    segmenter = spec_for(enum | {"kwargs": {"aux_loss": True}, "preprocessing": None})
    check_model(segmenter.model, "segmentation")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            {"architecture": "resnet18", "weights": "DEFAULT", "kwargs": {"num_classes": 10}},
            "model.kwargs: The parameter 'num_classes' expected value 1000 but got 10 instead.",
        ),
        (
            {"architecture": "vit_b_16", "weights": "IMAGENET1K_V1", "kwargs": {"image_size": 384}},
            "model.kwargs: The parameter 'image_size' expected value 224 but got 384 instead.",
        ),
        (
            {"architecture": "vit_b_16", "kwargs": {"image_size": 100}},
            "model.kwargs: Input shape indivisible by patch size!",
        ),
    ],
)
def test_keywords_the_weights_or_the_architecture_refuse_fail_before_any_work(
    model: dict, message: str
) -> None:
    """torchvision refuses them as it builds (ValueError, AssertionError): checked on the meta
    device, going as far as fetching the weights, which it never does."""
    from torchvision.models import ResNet18_Weights, WeightsEnum

    with pytest.raises(ModelError) as refused:
        check_model(spec_for(model).model)
    assert str(refused.value) == message
    assert ResNet18_Weights.get_state_dict is WeightsEnum.get_state_dict  # as it was


@pytest.mark.parametrize(
    ("task", "model", "crop", "refusal"),
    [
        ("classification", {"architecture": "vit_b_16"}, 64, "Expected 224 but got 64"),
        ("embedding", {"architecture": "vit_b_16"}, 64, "Expected 224 but got 64"),
        ("classification", {"architecture": "maxvit_t"}, 64, "is invalid for input of size"),
        ("classification", {"architecture": "inception_v3"}, 32, "Kernel size can't be greater"),
        # the weights fix a ViT's image_size: 518 for vit_h_14's DEFAULT (SWAG), as they build
        ("classification", {"architecture": "vit_h_14", "weights": "DEFAULT"}, 224, "518"),
        ("classification", {"architecture": "vit_h_14", "weights": "DEFAULT"}, 518, None),
        ("classification", {"architecture": "vit_b_16"}, 224, None),
        ("embedding", {"architecture": "resnet18"}, 64, None),
        ("embedding", {"architecture": "swin_t"}, 64, None),
        ("classification", {"architecture": "regnet_y_400mf"}, 64, None),  # unchecked: no meta
    ],
)
def test_a_crop_the_model_cannot_take_fails_before_any_work(
    task: str, model: dict, crop: int, refusal: str | None
) -> None:
    """The model, built on the meta device as far as its weights, runs once on a meta batch of
    one crop: a crop it refuses is a ModelError naming model.preprocessing.crop (every actor
    failed at start-up with the model's own AssertionError or RuntimeError)."""
    from vision_ops.models import check_job

    preprocessing = PREP | {"resize": crop, "crop": crop}
    spec = parse_spec(
        {**BASE, "task": {"kind": task}, "model": model | {"preprocessing": preprocessing}}
    )
    if refusal is None:
        check_job(spec, files=False)
        return
    with pytest.raises(ModelError) as refused:
        check_job(spec, files=False)
    message = str(refused.value)
    assert message.startswith(f"model.preprocessing.crop: {model['architecture']} cannot take ")
    assert f"{crop} x {crop}" in message and refusal in message


def test_an_entrypoints_own_error_is_told_apart_from_keywords_it_does_not_take() -> None:
    linear = {"kind": "entrypoint", "entrypoint": "torch.nn:Linear", "preprocessing": None}
    typo = spec_for(linear | {"kwargs": {"in_features": 2, "out_feature": 3}}).model
    with pytest.raises(ModelError) as refused:
        load_model(typo)
    assert str(refused.value) == (
        "model.kwargs: torch.nn:Linear: missing a required argument: 'out_features'"
    )
    extra = spec_for(linear | {"kwargs": {"in_features": 2, "out_features": 3, "bais": 1}}).model
    with pytest.raises(ModelError) as refused:
        load_model(extra)
    assert str(refused.value) == (
        "model.kwargs: torch.nn:Linear: got an unexpected keyword argument 'bais'"
    )
    inside = spec_for(linear | {"kwargs": {"in_features": 2, "out_features": "3"}}).model
    with pytest.raises(TypeError) as raised:  # its own error (exit 1), not the spec's (exit 2)
        load_model(inside)
    assert not isinstance(raised.value, ModelError) and "empty()" in str(raised.value)


def test_a_folder_named_as_a_model_file_or_labels_is_refused_naming_the_field(tmp_path) -> None:
    from vision_ops.models import check_model_files, read_pinned

    model = spec_for(torchvision_file_model(str(tmp_path))).model
    with pytest.raises(ModelError, match=f"^model.weights: {tmp_path} is a folder, expected a"):
        check_model_files(model)
    with pytest.raises(ModelError, match=f"^model weights {tmp_path}: cannot be read: IsADir"):
        read_pinned(str(tmp_path), None, {})
    with pytest.raises(ModelError, match=f"^model.labels: {tmp_path} cannot be read: IsADir"):
        load_labels(str(tmp_path))


def test_a_segmenter_that_would_crop_its_input_is_refused() -> None:
    """A mask covers the model's input; with crop < resize that is the middle of the image,
    which the tile's GeoTIFF mask, the evaluation's truth and the overlay placed over all of
    it (silently shifted and stretched)."""
    prep = {"resize": 256, "crop": 224, "mean": [0.5] * 3, "std": [0.25] * 3}
    model = {"architecture": "lraspp_mobilenet_v3_large", "preprocessing": prep}
    spec = spec_for(model, kind="segmentation")
    with pytest.raises(
        ModelError, match=r"expected resize equal to crop .* resize 256 and crop 224"
    ):
        check_model(spec.model, "segmentation")
    assert (
        resolve_preprocessing(spec.model, "classification").crop == 224
    )  # a classifier's own affair
    square = spec_for(model | {"preprocessing": prep | {"resize": 224}}, kind="segmentation")
    assert resolve_preprocessing(square.model, "segmentation").crop == 224


def test_preprocessing_is_required_without_weights_metadata() -> None:
    spec = spec_for({"kind": "torchscript", "uri": "/x.pt"})
    model = spec.model.model_copy(update={"preprocessing": None})
    with pytest.raises(ModelError, match=r"model\.preprocessing: required for a torchscript model"):
        resolve_preprocessing(model)


def test_state_dict_hash_changes_with_the_weights(reference) -> None:
    other = tiny_classifier()
    assert state_dict_sha256(other) == state_dict_sha256(reference)
    with torch.no_grad():
        other.classifier[-1].bias[0] += 1e-3
    assert state_dict_sha256(other) != state_dict_sha256(reference)


def test_weights_unavailable_is_none_for_files_and_cached_enums(tmp_path, monkeypatch) -> None:
    from vision_ops.models import weights_unavailable

    assert weights_unavailable(spec_for(torchvision_file_model("/x.pt")).model) is None
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    enum_spec = spec_for({"architecture": "resnet18", "weights": "IMAGENET1K_V1"}).model
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / url.rsplit("/", 1)[1]).write_bytes(b"cached")
    assert weights_unavailable(enum_spec) is None


def test_a_model_file_that_cannot_be_reached_is_refused_naming_the_field(monkeypatch) -> None:
    """No S3 server answers: the check names the field and the store's own error."""
    from vision_ops.config import TorchvisionModel
    from vision_ops.models import check_model_files

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    options = {
        "s3": {
            "endpoint_url": "http://127.0.0.1:1",
            "config_kwargs": {"connect_timeout": 1, "retries": {"max_attempts": 1}},
        }
    }
    spec = TorchvisionModel(architecture="resnet18", weights="s3://models/w.pt")
    with pytest.raises(ModelError, match=r"^model.weights: s3://models/w.pt cannot be read: "):
        check_model_files(spec, options)


def test_a_classifiers_batch_it_fails_on_whole_is_error_rows_where_a_black_image_passes(
    weights_file,
) -> None:
    """A fixed-size model is sure to take a black image at its crop: where every image of a
    batch (a batch of one too) fails, that probe tells the images' fault from the model's,
    from the actor's first batch on; a model that fails on it too raises."""
    classifier = Classifier(spec_for(torchvision_file_model(weights_file), top_k=3))  # type: ignore[arg-type]
    model = classifier.module

    def fails_on_any_light(pixels: torch.Tensor) -> torch.Tensor:
        if bool(pixels.any()):
            raise RuntimeError("this input breaks the model")
        return model(pixels)

    classifier.module = fails_on_any_light  # type: ignore[assignment]
    side = PREP["crop"]
    grey = np.full((2, side, side, 3), 128, dtype=np.uint8)
    batch = {"image": grey, "status": np.array(["ok", "ok"], dtype=object)}
    batch |= {"error_type": np.full(2, None, object), "error_message": np.full(2, None, object)}
    for rows in (slice(0, 2), slice(0, 1)):
        out = classifier({name: values[rows] for name, values in batch.items()})
        assert set(out["status"]) == {"error"}
        assert set(out["error_message"]) == {"this input breaks the model"}

    def device_lost(pixels: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    classifier.module = device_lost  # type: ignore[assignment]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        classifier({name: values[:1] for name, values in batch.items()})


def test_fewer_labels_than_the_classifiers_outputs_fail_before_any_work(tmp_path) -> None:
    """The outputs come from the model's run on the meta device (num_classes 12), the labels
    from their file: 3 labels for 12 outputs were found by every actor at start-up."""
    from vision_ops.models import check_job

    three, twelve = tmp_path / "three.txt", tmp_path / "twelve.txt"
    three.write_text("a\nb\nc\n")
    twelve.write_text("".join(f"class {i}\n" for i in range(12)))
    model = {"architecture": "resnet18", "num_classes": 12}
    with pytest.raises(ModelError) as refused:
        check_job(spec_for(model | {"labels": f"file://{three}"}))
    assert str(refused.value) == "model.labels: the model has 12 outputs, found only 3 labels"
    check_job(spec_for(model | {"labels": f"file://{twelve}"}))


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ([5000], "task.classes: no class id 5000; expected ids 0 to 90"),
        ([-1], "task.classes: no class id -1; expected ids 0 or more"),
        ([], "task.classes: List should have at least 1 item after validation, not 0"),
    ],
)
def test_a_detection_allow_list_that_keeps_nothing_fails_before_any_work(
    classes: list, message: str
) -> None:
    """Every image came back with no boxes, each row `ok`."""
    from vision_ops.config import SpecError
    from vision_ops.models import check_job

    raw = {**BASE, "task": {"kind": "detection", "classes": classes}}
    raw["model"] = {"architecture": "fasterrcnn_mobilenet_v3_large_fpn", "weights": "DEFAULT"}
    with pytest.raises((ModelError, SpecError)) as refused:
        check_job(parse_spec(raw), files=False)
    assert message in str(refused.value)
    check_job(parse_spec(raw | {"task": {"kind": "detection", "classes": [1, "dog"]}}), False)


def test_a_labels_file_may_name_only_some_of_a_detectors_ids(tmp_path) -> None:
    """Ids a labels file leaves out are named by their number (`schema.label_names`): an
    allow-list may keep them; only a torchvision model's own class count bounds them."""
    from vision_ops.models import check_job

    labels = tmp_path / "labels.json"
    labels.write_text('{"0": "person", "2": "car"}')
    model = {"architecture": "fasterrcnn_mobilenet_v3_large_fpn", "labels": f"file://{labels}"}
    raw = {**BASE, "task": {"kind": "detection", "classes": [7, "car"]}, "model": model}
    check_job(parse_spec(raw))


def test_segmenters_outputs_are_the_segmenters_not_their_backbones() -> None:
    """The meta build stops where the weights load; the module taken is the builder's `model`
    (21 classes), not the ImageNet backbone it built first (1000)."""
    raw = {**BASE, "task": {"kind": "segmentation"}}
    raw["model"] = {"architecture": "fcn_resnet50", "weights": "DEFAULT"}
    assert check_model(parse_spec(raw).model, "segmentation") == 21


def test_weights_without_a_classifier_are_refused() -> None:
    with pytest.raises(ModelError) as refused:
        check_model(spec_for({"architecture": "vgg16", "weights": "IMAGENET1K_FEATURES"}).model)
    assert str(refused.value).startswith(
        "model.weights: IMAGENET1K_FEATURES of vgg16 holds no classifier (its features only)"
    )
