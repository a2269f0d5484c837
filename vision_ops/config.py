"""The job spec: pydantic models validated before any work starts, loaded from YAML."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
import typing
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SerializeAsAny,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from vision_ops.errors import EXIT_BAD_SPEC, VisionOpsError
from vision_ops.storage import (
    CREDENTIALS_IN_URI,
    holds_credentials,
    known_protocol,
    masked_url,
    names_a_credential,
)

if TYPE_CHECKING:  # the registry imports this module's TaskSettings
    from vision_ops.tasks import Task

DEFAULT_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# A DICOM job's default: `.dcm`, `.dicom` and names without an extension or named by a UID ("").
DICOM_EXTENSIONS = (".dcm", ".dicom", "")
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
ENTRYPOINT_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def either(names: Sequence[str]) -> str:
    """Names as a message lists the choices: `a, b or c`."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]


class SpecError(VisionOpsError, ValueError):
    """A job spec that cannot run; the message names each field, what was expected and found."""

    exit_code = EXIT_BAD_SPEC


class StrictModel(BaseModel):
    # A number that is not finite (.inf, .nan in YAML) is refused wherever a field does not
    # say it takes one: a limit of infinity would overflow where it is used.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_yes_or_no_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """A YAML true/false (yes, no, on, off) where a field takes a number, not a flag, also
        inside its lists and mappings: pydantic would read it as 1 or 0 (`batch_size: yes` as a
        batch of one, `min: {accuracy: yes}` as a floor of 1)."""
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and _a_flag_for_a_number(value, field.annotation):
            raise PydanticCustomError("number_not_flag", "expected a number, found a yes or no")
        return value


def _a_flag_for_a_number(value: Any, annotation: Any) -> bool:
    """Whether `value` holds a bool where `annotation` takes a number and not a bool, at its
    top or inside the lists, tuples and mappings the annotation names."""
    if isinstance(value, bool):
        kinds = set(typing.get_args(annotation)) or {annotation}
        return bool(kinds & {int, float}) and bool not in kinds
    for kind in (annotation, *typing.get_args(annotation)):  # the annotation, or a union's
        origin, inner = typing.get_origin(kind), typing.get_args(kind)
        if isinstance(value, list | tuple) and origin in (list, tuple, Sequence) and inner:
            items = [t for t in inner if t is not Ellipsis]
            return any(
                _a_flag_for_a_number(item, items[min(i, len(items) - 1)])
                for i, item in enumerate(value)
            )
        if isinstance(value, dict) and origin in (dict, Mapping) and len(inner) == 2:
            return any(_a_flag_for_a_number(item, inner[1]) for item in value.values())
    return False


def _no_credentials_in(uri: str) -> str:
    if holds_credentials(uri):
        raise ValueError(CREDENTIALS_IN_URI)
    return uri


# A URI a spec names (inputs, the table, model files, labels, the hold-out): never credentials.
Uri = Annotated[str, AfterValidator(_no_credentials_in)]


# Standard display windows (centre, width) in Hounsfield units, as radiology viewers name them.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
# How a DICOM frame becomes 8-bit when no preset or explicit window is given.
WINDOW_MODES = ("file", "full_range")
# DICOM PS3.15 Table E.1-1 (basic de-identification profile): patient and staff identifiers and
# the dates and places that single a patient out. Written only when listed in `phi_tags`.
PHI_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "PatientMotherBirthName",
        "PatientBirthName",
        "PatientComments",
        "PatientReligiousPreference",
        "PatientInsurancePlanCodeSequence",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "IssuerOfPatientID",
        "MedicalRecordLocator",
        "EthnicGroup",
        "Occupation",
        "MilitaryRank",
        "BranchOfService",
        "CountryOfResidence",
        "RegionOfResidence",
        "AdditionalPatientHistory",
        "PregnancyStatus",
        "LastMenstrualDate",
        "SmokingStatus",
        "MedicalAlerts",
        "Allergies",
        "ResponsiblePerson",
        "ResponsibleOrganization",
        "ReferringPhysicianName",
        "ReferringPhysicianAddress",
        "ReferringPhysicianTelephoneNumbers",
        "PerformingPhysicianName",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "RequestingPhysician",
        "OperatorsName",
        "ScheduledPerformingPhysicianName",
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "SeriesDate",
        "SeriesTime",
        "AcquisitionDate",
        "AcquisitionTime",
        "AcquisitionDateTime",
        "ContentDate",
        "ContentTime",
        "StudyDescription",
        "SeriesDescription",
        "RequestAttributesSequence",
        "AdmittingDiagnosesDescription",
        "PersonName",
        "VerifyingObserverName",
        "ContentCreatorName",
        "RequestedProcedureID",
        "PerformedProcedureStepID",
        "ScheduledProcedureStepID",
        "FillerOrderNumberImagingServiceRequest",
        "PlacerOrderNumberImagingServiceRequest",
        "ImageComments",
        "FrameComments",
        "DerivationDescription",
        "ProtocolName",
        "PatientState",
        "ReasonForStudy",
        "ReasonForTheRequestedProcedure",
        "SpecialNeeds",
        "PatientTransportArrangements",
        "RequestedContrastAgent",
        "DeviceUID",
        "InstanceCreatorUID",
    }
)
# Beyond the table's keywords, those of the kinds its rules remove: a person's name, a date or
# time, a sequence (written whole, with every nested element), free text (LT, ST, UT), and a
# text value (TEXT_VRS) naming an identifier (not a UID: the table's UID columns hold those), an
# address, a place, a comment or a description; `SliceLocation`, a number, is a position.
PHI_VRS = frozenset({"PN", "DA", "DT", "TM", "SQ", "LT", "ST", "UT"})
TEXT_VRS = frozenset({"LO", "SH", "UC", "CS"})
PHI_WORDS = re.compile(r"(?<!U)ID$|Address|Telephone|Location|Residence|Comments|Description")
DICOM_KEYWORD_PATTERN = r"^[A-Z][A-Za-z0-9]*$"


def identifying(keyword: str) -> bool:
    """Whether a DICOM keyword (one pydicom knows) may identify a patient: one of PS3.15
    Table E.1-1's, or of a kind its rules remove (`PHI_VRS`, `PHI_WORDS` on a text value)."""
    from pydicom.datadict import dictionary_VR

    if keyword in PHI_KEYWORDS:
        return True
    vr = dictionary_VR(keyword)
    return vr in PHI_VRS or (vr in TEXT_VRS and PHI_WORDS.search(keyword) is not None)


class Window(StrictModel):
    center: float = Field(description="Window centre, in the units after the modality LUT.")
    width: float = Field(ge=1, description="Window width (at least 1), same units.")


WindowSetting = Annotated[
    Annotated[str, Tag("name")] | Annotated[Window, Tag("levels")],
    Discriminator(lambda value: "levels" if isinstance(value, dict | Window) else "name"),
]


class DicomSpec(StrictModel):
    window: WindowSetting = Field(
        default="file",
        description="How values become 8-bit: `file` (the instance's own VOI LUT or window, "
        "else its full range), `full_range` (each frame's min..max), a preset "
        f"({', '.join(WINDOW_PRESETS)}) or {{center, width}}.",
    )
    tags: list[str] = Field(
        default_factory=list,
        description="More DICOM keywords written to the `dicom_tags` map column (e.g. "
        "SliceThickness, Manufacturer...). Patient identifiers are refused here.",
    )
    phi_tags: list[str] = Field(
        default_factory=list,
        description="Patient identifiers (basic de-identification profile) to write anyway, "
        "in `dicom_tags`: an explicit, reviewed opt-in. Empty by default.",
    )

    @field_validator("window")
    @classmethod
    def _known_window(cls, value: str | Window) -> str | Window:
        if isinstance(value, str) and value not in (*WINDOW_MODES, *WINDOW_PRESETS):
            names = ", ".join([*WINDOW_MODES, *WINDOW_PRESETS])
            raise ValueError(f"expected one of {names} or {{center, width}}, found {value!r}")
        return value

    @field_validator("tags", "phi_tags")
    @classmethod
    def _keywords(cls, value: list[str]) -> list[str]:
        unknown = [k for k in value if not re.match(DICOM_KEYWORD_PATTERN, k)]
        if value and not unknown:
            unknown = _unknown_dicom_keywords(value)
        if unknown:
            raise ValueError(
                f"expected DICOM dictionary keywords such as SliceThickness, found {unknown}"
            )
        return value

    @field_validator("tags")
    @classmethod
    def _no_phi(cls, value: list[str]) -> list[str]:
        phi = sorted(keyword for keyword in set(value) if identifying(keyword))
        if phi:
            raise ValueError(
                f"{', '.join(phi)}: patient identifiers (DICOM basic de-identification profile: "
                "its listed tags, and any person name, date, time, sequence, identifier, "
                "address, place, comment or description) are never written from `tags`; list "
                "them under `phi_tags` to opt in deliberately"
            )
        return value


def _unknown_dicom_keywords(keywords: list[str]) -> list[str]:
    try:
        from pydicom.datadict import tag_for_keyword
    except ImportError:
        raise ValueError("DICOM tags need pydicom: pip install 'vision-ops[dicom]'") from None
    return [keyword for keyword in keywords if tag_for_keyword(keyword) is None]


DEFAULT_BANDS = (1, 2, 3)  # a scene's bands read as RGB where `tiling.bands` is not set


class TilingSpec(StrictModel):
    size: int = Field(default=512, gt=0, description="Tile side in scene pixels.")
    overlap: int = Field(default=0, ge=0, description="Pixels shared by neighbouring tiles.")
    edge: Literal["shift", "pad", "drop"] = Field(
        default="shift",
        description="The last tile of a row or column: `shift` it back inside the scene, `pad` "
        "it past the edge with nodata, or `drop` it (its pixels are not covered).",
    )
    bands: list[int] | None = Field(
        default=None,
        description="1-based band numbers in RGB order (e.g. [4, 3, 2] for Sentinel-2), or one "
        "band, shown as grey. Default: 1, 2, 3, or band 1 as grey for a scene or image of fewer "
        "than three bands (a grey PNG, a one-band GeoTIFF).",
    )
    value_range: tuple[float, float] | None = Field(
        default=None,
        description="Values mapped onto 0..255 (low, high). Default: the data type's range for "
        "integers (0..255, 0..65535), else the percentile stretch.",
    )
    percentile: tuple[float, float] | None = Field(
        default=None,
        description="Stretch each scene from these percentiles of its valid pixels (e.g. "
        "[2, 98]), measured on a reduced read of the scene.",
    )
    nodata: float | None = Field(
        default=None,
        allow_inf_nan=True,
        description="The no-data value (.nan for a float scene's NaN); defaults to the file's own.",
    )

    def fingerprinted(self) -> dict[str, Any]:
        """The settings as the model fingerprint and the spec's digest hold them: bands left
        to their default as [1, 2, 3], the default before a scene of fewer bands was read as
        grey (such a scene was an error row, which an incremental run retries), so that the
        upgrade neither makes every scene of a table new to an incremental run nor changes a
        spec's default run id (a date run again would be a run beside the first) or the
        resume key of an attempt killed before it."""
        settings = self.model_dump(mode="json")
        if self.bands is None:
            settings["bands"] = list(DEFAULT_BANDS)
        return settings

    @model_validator(mode="after")
    def _consistent(self) -> TilingSpec:
        if self.overlap >= self.size:
            raise ValueError(
                f"overlap: expected less than size ({self.size}), found {self.overlap}"
            )
        if self.bands is not None and (len(self.bands) not in (1, 3) or min(self.bands) < 1):
            raise ValueError(f"bands: expected 1 or 3 band numbers from 1, found {self.bands}")
        if self.value_range is not None and self.percentile is not None:
            raise ValueError("expected one of value_range or percentile, found both")
        if self.value_range is not None and self.value_range[1] <= self.value_range[0]:
            raise ValueError(f"value_range: expected low < high, found {list(self.value_range)}")
        if self.percentile is not None and not 0 <= self.percentile[0] < self.percentile[1] <= 100:
            raise ValueError(
                f"percentile: expected 0 <= low < high <= 100, found {self.percentile}"
            )
        return self


class InputSpec(StrictModel):
    uris: list[Uri] = Field(
        default_factory=list,
        description="Files, directories (listed recursively) or globs (`**` recurses), "
        "as fsspec URLs (s3://, gs://, az://, file://, memory://) or local paths.",
    )
    manifest: Uri | None = Field(
        default=None,
        description="A file listing the inputs: text (one URI a line), CSV or Parquet "
        "(a `uri` column, or `bucket` + `key` columns as in an S3 Inventory report), or an S3 "
        "Inventory report's manifest.json (its CSV or Parquet data files are read).",
    )
    extensions: list[str] = Field(
        default=list(DEFAULT_EXTENSIONS),
        validate_default=True,
        description="File-name extensions to keep (case-insensitive); an empty list keeps all.",
    )

    max_pixels: int = Field(
        default=178_956_970,
        gt=0,
        description="Largest image (width x height) to decode; larger ones become error rows "
        "(decompression-bomb guard).",
    )

    bits_stored: int = Field(
        default=16,
        ge=8,
        le=16,
        description="Significant bits of 16-bit PNG and TIFF images: 12 where a 12-bit sensor "
        "or scanner stores 0..4095 in a 16-bit file (scaled to 8 bits from that range, higher "
        "values clipped); at 16 such images come out nearly black. DICOM has its own windowing "
        "(`dicom`), scenes their own stretch.",
    )

    max_file_mb: int = Field(
        default=2048,
        gt=0,
        description="Largest file read whole, in MiB (by the size the listing found); larger "
        "ones become error rows (`FileTooLarge`) without a byte downloaded (of a manifest entry "
        "with an ETag but no size, no more than the cap and a byte). The default passes any "
        "image under `max_pixels`, uncompressed; tiled scenes are read by window, uncapped.",
    )

    dicom: DicomSpec | None = Field(
        default=None,
        description="Read DICOM instances: windowing and the tags written as columns. Set it "
        "(`dicom: {}` takes the defaults) to add the DICOM columns to the table.",
    )

    tiling: TilingSpec | None = Field(
        default=None,
        description="Cut each input (a GeoTIFF / COG scene, or a large plain image) into tiles: "
        "one unit per tile, with its window and, for georeferenced scenes, its footprint.",
    )

    @model_validator(mode="before")
    @classmethod
    def _dicom_extensions(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("dicom") is not None and "extensions" not in value:
            return value | {"extensions": list(DICOM_EXTENSIONS)}
        return value

    @field_validator("uris", "manifest")
    @classmethod
    def _known_protocols(cls, value: list[str] | str | None) -> list[str] | str | None:
        for uri in [value] if isinstance(value, str) else value or []:
            known_protocol(uri)
        return value

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        """Lower case with a leading dot; "" stands for names without an extension. A pattern
        (`*.png`) or a suffix of two dots (`.ome.tif`) would match no name: refused."""
        for ext in value:
            if re.search(r"[*?\[\]/\\]", ext) or "." in ext.lstrip("."):
                raise ValueError(
                    f"{ext!r}: expected a file extension such as .jpg or tif (the part after "
                    "a name's last dot; no wildcards, no folders)"
                )
        return sorted({("." + ext.lstrip(".")).lower() if ext else "" for ext in value})

    @model_validator(mode="after")
    def _needs_something_to_read(self) -> InputSpec:
        if not self.uris and self.manifest is None:
            raise ValueError("expected at least one of `uris` or `manifest`, found neither")
        if self.tiling is not None and self.dicom is not None:
            raise ValueError("expected one of `tiling` or `dicom`, found both")
        return self


class Preprocessing(StrictModel):
    resize: int = Field(gt=0, description="Resize the shorter side to this many pixels.")
    crop: int = Field(gt=0, description="Then take a centre square crop of this size.")
    mean: tuple[float, float, float] = Field(description="Per-channel mean, on a 0-1 scale.")
    std: tuple[float, float, float] = Field(description="Per-channel std, on a 0-1 scale.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = Field(
        default="bilinear", description="Resampling filter of the resize."
    )

    @field_validator("std")
    @classmethod
    def _std_positive(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(value) <= 0:
            raise ValueError(f"expected three positive numbers, found {list(value)}")
        return value


# The model fields that may name a file the model loads (`weights` may name an enum instead),
# and the label sets `labels` may name instead of a file (models.BUILTIN_LABELS loads them).
MODEL_FILE_FIELDS = ("weights", "uri", "detector", "recognizer", "dictionary")
IMAGENET_LABELS = "imagenet-1k"
BUILTIN_LABEL_SETS = (IMAGENET_LABELS,)


class _ModelCommon(StrictModel):
    name: str | None = Field(
        default=None, description="Model name written to every row; defaults from the model."
    )
    labels: Uri | None = Field(
        default=None,
        description="Labels: a .txt (one a line) or .json (list, or {id: label}) file URI, or "
        "`imagenet-1k`. Defaults to the weights' own categories, else numeric ids.",
    )
    preprocessing: Preprocessing | None = Field(
        default=None,
        description="Resize/crop/normalisation; defaults to the torchvision weights' transforms.",
    )

    def files(self) -> dict[str, str]:
        """The URIs of the files the model reads, by field: those it loads, and its labels
        (a weights enum's name and a built-in label set are no file)."""
        named = {name: getattr(self, name, None) for name in MODEL_FILE_FIELDS}
        files = {
            name: uri
            for name, uri in named.items()
            if uri and not (name == "weights" and WEIGHTS_ENUM_NAME.match(uri))
        }
        if self.labels and self.labels not in BUILTIN_LABEL_SETS:
            files["labels"] = self.labels
        return files


# A torchvision weights enum member's name (DEFAULT, IMAGENET1K_V2), as `model.weights` takes it
# beside a weights file's URI.
WEIGHTS_ENUM_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")


def _pins_a_file(weights: str | None, weights_sha256: str | None) -> None:
    """ValueError where `weights_sha256` is given without a weights file to compare it with: a
    pin never compared would read as one kept."""
    if weights_sha256 and (weights is None or WEIGHTS_ENUM_NAME.match(weights)):
        raise ValueError(
            f"model.weights_sha256 pins a weights file; model.weights is {weights or 'not set'}: "
            "expected the URI of a state_dict or checkpoint file (a weights enum's download is "
            "checked by torchvision's own hash)"
        )


class TorchvisionModel(_ModelCommon):
    kind: Literal["torchvision"] = Field(
        default="torchvision",
        description="A torchvision architecture, with weights from its enum or a file.",
    )
    architecture: str = Field(description="A torchvision classification model name, e.g. resnet50.")
    weights: Uri | None = Field(
        default=None,
        description="A torchvision weights enum name (DEFAULT, IMAGENET1K_V2, ...: downloads "
        "where a hub is reachable) or the URI of a state_dict / checkpoint file.",
    )
    weights_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Refuse a weights file of other hash."
    )
    num_classes: int | None = Field(
        default=None, gt=0, description="Classes of a fine-tuned head; defaults to the weights'."
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="More torchvision builder arguments, e.g. {min_size: 512, max_size: 1024} "
        "for a detector's internal resize.",
    )

    @model_validator(mode="after")
    def _pinned_file(self) -> TorchvisionModel:
        _pins_a_file(self.weights, self.weights_sha256)
        return self


class OutputAdapter(StrictModel):
    layout: str = Field(
        default="yolo",
        description="The registered output layout to decode (`yolo`: one (4 + classes, cells) "
        "tensor per image of box centre, size and class scores, in letterboxed pixels).",
    )
    input_size: int = Field(default=640, gt=0, description="The square letterbox side.")
    pad_value: int = Field(default=114, ge=0, le=255, description="Letterbox padding grey.")
    nms_iou: float = Field(
        default=0.7, gt=0, le=1, description="Per-class NMS IoU (task.nms_iou overrides it)."
    )


class TorchScriptModel(_ModelCommon):
    kind: Literal["torchscript"] = Field(
        default="torchscript", description="A torch.jit.save file."
    )
    uri: Uri = Field(description="URI of a TorchScript file (torch.jit.save).")
    sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Refuse a file of other hash."
    )
    adapter: OutputAdapter | None = Field(
        default=None,
        description="A detector outside torchvision: decode its raw output with this adapter.",
    )


class OnnxModel(_ModelCommon):
    kind: Literal["onnx"] = Field(
        default="onnx",
        description="An ONNX detector run with onnxruntime, its output decoded by `adapter`.",
    )
    uri: Uri = Field(description="URI of an ONNX detector, run with onnxruntime.")
    sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Refuse a file of other hash."
    )
    adapter: OutputAdapter = Field(
        default_factory=OutputAdapter, description="How to decode the model's raw output."
    )


class EntrypointModel(_ModelCommon):
    kind: Literal["entrypoint"] = Field(
        default="entrypoint", description="A function returning a torch.nn.Module."
    )
    entrypoint: str = Field(
        pattern=ENTRYPOINT_PATTERN,
        description="`package.module:function` returning a torch.nn.Module.",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Passed to the function.")
    weights: Uri | None = Field(default=None, description="URI of a state_dict to load into it.")
    weights_sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Refuse a weights file of other hash."
    )

    @model_validator(mode="after")
    def _pinned_file(self) -> EntrypointModel:
        _pins_a_file(self.weights, self.weights_sha256)
        return self


class PpOcrModel(_ModelCommon):
    kind: Literal["ppocr"] = Field(
        default="ppocr",
        description="A PP-OCR detector and recogniser pair (ONNX) with its dictionary.",
    )
    detector: Uri | None = Field(
        default=None,
        description="URI of a PP-OCR DB text detector (ONNX); defaults to the PP-OCRv4 detector "
        "the rapidocr_onnxruntime package ships (the ocr extra).",
    )
    recognizer: Uri | None = Field(
        default=None,
        description="URI of a PP-OCR CTC text recogniser (ONNX, 48 px high input); defaults to "
        "the package's PP-OCRv4 recogniser.",
    )
    dictionary: Uri | None = Field(
        default=None,
        description="URI of the recogniser's character list (a text file, one character a "
        "line); defaults to the list in the recogniser's own ONNX metadata.",
    )

    @model_validator(mode="after")
    def _no_labels_or_preprocessing(self) -> PpOcrModel:
        if self.labels is not None or self.preprocessing is not None:
            raise ValueError(
                "a ppocr model reads text: expected no labels and no preprocessing (it sizes "
                "each image itself), found them"
            )
        return self


def _kind_or(default: str) -> Callable[[Any], str]:
    """Discriminate a union by its `kind`, taking `default` when the spec leaves it out."""

    def kind(value: Any) -> str:
        found = (
            value.get("kind", default)
            if isinstance(value, dict)
            else getattr(value, "kind", default)
        )
        return str(found)

    return kind


def _of_the_default_kind(section: Any, default: str) -> bool:
    """Whether a `model:` section without a kind is of the task's default model kind: its
    fields are not all another kind's (`{architecture: ...}` is torchvision's; a misspelt
    field of the default kind is named as that kind's)."""
    if not isinstance(section, dict) or "kind" in section:
        return False
    others = (model for kind, model in _MODEL_KINDS.items() if kind != default)
    return not section or not any(set(section) <= set(model.model_fields) for model in others)


_MODEL_KINDS: dict[str, type[BaseModel]] = {
    "torchvision": TorchvisionModel,
    "torchscript": TorchScriptModel,
    "entrypoint": EntrypointModel,
    "onnx": OnnxModel,
    "ppocr": PpOcrModel,
}

ModelSpec = Annotated[
    Annotated[TorchvisionModel, Tag("torchvision")]
    | Annotated[TorchScriptModel, Tag("torchscript")]
    | Annotated[EntrypointModel, Tag("entrypoint")]
    | Annotated[OnnxModel, Tag("onnx")]
    | Annotated[PpOcrModel, Tag("ppocr")],
    Discriminator(
        _kind_or("torchvision"),
        custom_error_type="model_kind",
        custom_error_message=f"expected kind: {either([*_MODEL_KINDS])}",
    ),
]


class TaskSettings(StrictModel):
    """The spec's `task:` section. Each registered task (vision_ops.tasks) has its own
    subclass, its record's `spec`; `JobSpec` validates the section against the one its `kind`
    names (default: classification)."""

    kind: str = Field(description="The registered task, e.g. classification or detection.")

    def metrics_not_given(self) -> dict[str, str]:
        """The task's metrics its scorer cannot give a run of these settings, each with the
        setting that keeps it out (none here)."""
        return {}


DEFAULT_TASK = "classification"
# The model kinds a task that runs a network takes (a task record's default `model_kinds`).
NETWORK_MODEL_KINDS = ("torchvision", "torchscript", "entrypoint", "onnx")


def task_settings(value: Any) -> TaskSettings:
    """The spec's `task:` section validated against the settings model of the task its `kind`
    names (vision_ops.tasks); a ValidationError located in the section where it does not fit."""
    if isinstance(value, TaskSettings):
        return value
    if not isinstance(value, dict):
        raise PydanticCustomError(
            "task_section", "expected a mapping with a kind ({kinds})", {"kinds": _task_kinds()}
        )
    record = _task_record(value)
    if record is None:
        raise PydanticCustomError("task_kind", "expected kind: {kinds}", {"kinds": _task_kinds()})
    return record.spec.model_validate(value)


def _task_record(section: Any) -> Task | None:
    """The registry record (vision_ops.tasks.Task) of the task a `task:` section names, or None
    where it names none that is registered."""
    from vision_ops.tasks import TASKS  # the registry holds this module's TaskSettings models

    if isinstance(section, TaskSettings):
        kind: Any = section.kind
    else:
        kind = section.get("kind", DEFAULT_TASK) if isinstance(section, dict) else None
    return TASKS.get(kind) if isinstance(kind, str) and kind in TASKS else None


def _task_kinds() -> str:
    from vision_ops.tasks import TASKS

    return either(list(TASKS.names()))


# Union tags pydantic puts in error locations after the field (model.torchvision.weights,
# input.dicom.window.levels.width); dropped when reported.
UNION_TAGS = {"model": frozenset(_MODEL_KINDS), "window": frozenset({"name", "levels"})}


READ_BATCH_SIZE = 16  # files a read task fetches and decodes
DEVICE_DECODE_READ_BATCHES = 4  # model batches a read task fetches when the actors decode
# Inputs a run needs before torch.compile pays for itself on CPUs: each actor spends seconds
# compiling, and the compiled model saves about 4 ms an image (docs/performance.md, "Start-up"):
# about 13 s of compiling where the node compiled the model before, about 35 s where it did not.
COMPILE_MIN_INPUTS = 3000
COMPILE_MIN_INPUTS_COLD = 8000
# Units a run with `predict_in: auto` runs in the driver's threads on a one-node CPU cluster,
# where five bench rounds on 2 cores found the driver's way faster every time; at 2,000 it was
# a break-even (docs/performance.md, "`predict_in: auto`").
DRIVER_MAX_INPUTS = 1000
# What `runtime.runner: in_process` cannot run: each as the spec's refusal says it.
IN_PROCESS_RULED_OUT = (
    "the inputs include a manifest (Ray Data reads it), DICOM instances (their frames are read "
    "in blocks Ray Data streams), or scenes cut into tiles (planned in Ray tasks), the model is "
    "asked onto a GPU, or the runtime autoscales"
)


@dataclass(frozen=True)
class BatchSizes:
    """Images per model call for a task when the spec leaves runtime.batch_size out."""

    cpu: int  # an actor on CPU cores: larger batches only add memory and latency there
    gpu: int  # an actor holding a whole GPU; one holding a share of a GPU gets that share


def default_batch_size(task: str, gpu_share: float) -> int:
    """The task's images per call (its record's `batch_sizes`, vision_ops.tasks) for an actor
    holding `gpu_share` GPUs (0: CPU only); a share of a GPU gets that share of a whole GPU's
    batch, in a power of two."""
    from vision_ops.tasks import get_task  # the registry names this module's task models

    sizes = get_task(task).batch_sizes
    if gpu_share <= 0:
        return sizes.cpu
    return max(1, 2 ** math.floor(math.log2(sizes.gpu * min(gpu_share, 1.0))))


class RuntimeSpec(StrictModel):
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Images per model call. By default derived from the task and the actor's "
        "device (e.g. classification 8 on CPUs, 256 on a whole GPU; detection 4 and 16; "
        "each task's in its record, vision_ops.tasks); an actor with a share of a GPU gets "
        "that share (a power of two).",
    )
    min_actors: int | None = Field(
        default=None,
        gt=0,
        description="Smallest predictor actor pool. By default the whole pool on a fixed "
        "cluster (every actor starts at once and none is stopped mid-run; no more than the "
        "run has model calls), and 1 where the cluster autoscales.",
    )
    max_actors: int | None = Field(
        default=None, gt=0, description="Largest pool; defaults to as many as the cluster fits."
    )
    num_gpus_per_actor: float | None = Field(
        default=None, ge=0, description="GPUs per actor; defaults to 1 where the cluster has GPUs."
    )
    num_cpus_per_actor: float = Field(default=1, gt=0, description="CPUs per predictor actor.")
    reserved_cpus: float = Field(
        default=1, ge=0, description="CPUs kept free of actors for reading and decoding."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: cuda when the actor has a GPU, else cpu."
    )
    autocast: Literal["off", "float16", "bfloat16"] = Field(
        default="off", description="Mixed precision on the GPU (ignored on the CPU)."
    )
    autoscaling: bool = Field(
        default=False,
        description="The cluster adds nodes on demand: the pool is sized on what its launcher "
        "config can reach (read on the head; else on the nodes up), not refused for the nodes "
        "up now.",
    )
    read_batch_size: int | None = Field(
        default=None,
        gt=0,
        description=f"Files fetched per read task call; by default {READ_BATCH_SIZE}, or "
        f"{DEVICE_DECODE_READ_BATCHES} model batches with decode: device, where read tasks "
        "only fetch bytes (fewer tasks to schedule).",
    )
    decode: Literal["tasks", "device"] = Field(
        default="tasks",
        description="Where JPEG photos are decoded and resized: in the CPU read tasks, or on the "
        "predictor's device (nvJPEG on a GPU; encoded bytes cross the object store). Other "
        "formats, EXIF-rotated JPEGs and files the device refuses are decoded on the CPU.",
    )
    channels_last: bool = Field(
        default=True,
        description="Run fixed-size models (classification, segmentation, embedding) in "
        "channels-last memory format, faster on CPUs and tensor cores.",
    )
    fold_batch_norm: bool = Field(
        default=True,
        description="Fold each BatchNorm of a fixed-size model (classification, segmentation, "
        "embedding) into the convolution before it as the model loads: one pass over the "
        "convolution's output, not two; the same outputs to float32 rounding, checked on a "
        "probe batch (a model whose output it would move runs as loaded, its weights to float "
        "rounding).",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile fixed-size models as each actor starts (inductor with "
        "freezing, one static batch shape; a C++ compiler on CPU nodes): slower start-up, faster "
        "batches.",
    )
    compile_min_inputs: int = Field(
        default=COMPILE_MIN_INPUTS,
        ge=0,
        description="With compile on, compile only a run of at least this many inputs to "
        "process (images, or tiles of cut scenes; a DICOM instance counts one; after "
        "--incremental's skip and a resumed attempt's sources): a shorter run loses more "
        f"to compiling than the faster batches win back. Default {COMPILE_MIN_INPUTS}, "
        "measured on CPUs with a warm compile cache; 0, with compile_min_inputs_cold 0: always "
        "compile.",
    )
    compile_min_inputs_cold: int = Field(
        default=COMPILE_MIN_INPUTS_COLD,
        ge=0,
        description="... and on a node that has not compiled this model (weights, batch shape, "
        "torch version and threads) before, whose first compile takes several times as long: "
        "a run of fewer inputs compiles only where the node's compile cache holds the model. "
        f"Default {COMPILE_MIN_INPUTS_COLD}, measured on CPUs; at most compile_min_inputs: no "
        "distinction.",
    )
    compile_only_where_cached: bool = Field(
        default=False,
        description="With compile on, an actor compiles only on a node that has compiled this "
        "model before (a record beside torch's compile cache) and runs it uncompiled elsewhere. "
        "The pipeline sets it for a run between compile_min_inputs and "
        "compile_min_inputs_cold.",
    )
    predict_in: Literal["actors", "driver", "auto"] = Field(
        default="actors",
        description="Where the model runs: in a pool of Ray actors, or in threads of the driver "
        "process, one per actor the pool would have (no more than the run's model calls), each "
        "with an actor's torch threads, uncompiled (Ray tasks still list and read). driver "
        "suits a short run on a one-node CPU cluster: no actor interpreters to start (seconds "
        "and about 1 GB each), at the cost of a process crash in the model ending the run (its "
        "durable rows resume); it is refused with GPUs for the pool, more nodes, autoscaling, "
        "and for tiled detection. auto: the driver where none of these holds, the input is "
        "not DICOM (whose frames are counted only as they are read) and the run has at most "
        "driver_max_inputs units to process, fewer than compile_min_inputs with compile on; "
        "else actors.",
    )
    runner: Literal["ray", "in_process", "auto"] = Field(
        default="ray",
        description="What runs the job: Ray (the embedded local cluster, or the one RAY_ADDRESS "
        "names), or this one process without Ray (in_process): it lists the inputs, reads and "
        "decodes them in threads and runs the model in threads as predict_in: driver does "
        "(whatever predict_in says), then commits as any run does. It suits a short run on one "
        "machine: no Ray to start (seconds) and none of Ray's processes (about 1 GB). It is "
        f"refused where {IN_PROCESS_RULED_OUT}; the model runs on the CPUs. auto: in this "
        "process where none of those holds, RAY_ADDRESS is unset, Ray is not up in the process "
        "already, device: auto finds no GPU and the listing holds at most driver_max_inputs "
        "inputs (fewer than compile_min_inputs with compile on); else Ray.",
    )
    driver_max_inputs: int = Field(
        default=DRIVER_MAX_INPUTS,
        ge=0,
        description="With predict_in: auto, the most units (images, tiles of cut scenes; "
        "after --incremental's skip and a resumed attempt's sources) a run hands to the "
        "driver's threads; a longer run starts actors. With runner: auto, the most inputs "
        "listed for a run in this process. Default "
        f"{DRIVER_MAX_INPUTS}, measured on CPUs; 0: always actors (and Ray).",
    )
    local_dashboard: bool = Field(
        default=False,
        description="Start Ray's dashboard (on 127.0.0.1 only) with the embedded local cluster "
        "a run starts where RAY_ADDRESS is unset: off, the cluster holds about 0.2 GB less PSS "
        "in 11 fewer processes and starts about a second sooner on 2 cores. A cluster joined "
        "through RAY_ADDRESS keeps whatever it runs.",
    )
    retain_host_memory: bool = Field(
        default=True,
        description="Predictor actors keep freed host memory for the next batch instead of "
        "handing it back to the OS (glibc): no page faults on every batch's tensors, at the "
        "cost of holding the peak working set.",
    )
    intra_op_threads: int | None = Field(
        default=None,
        gt=0,
        description="Torch threads per actor; defaults to the actor's CPUs, or on a node "
        "without GPUs to the node's CPUs shared among its actors (decoding needs few).",
    )
    queue_mb: int | None = Field(
        default=None,
        gt=0,
        description="Object store budget of the run's pipeline, in MB (Ray Data's limit): what "
        "read tasks may have queued ahead of the actors. Default: Ray Data's (a share of the "
        "cluster's object store).",
    )
    stall_timeout_s: int = Field(
        default=1800,
        gt=0,
        description="Fail the run, naming the stuck stages, when no stage makes progress for "
        "this long.",
    )
    durable_every_rows: int = Field(
        default=100_000,
        gt=0,
        description="Stage the rows received so far as a part file at least every this many "
        "rows (either output format), so a rerun of a run that did not commit resumes from them.",
    )
    durable_every_s: float = Field(
        default=120.0,
        gt=0,
        description="... or, as rows arrive, once this many seconds have passed since the "
        "last part file, whichever comes first (a crash loses at most this much of the pool's "
        "work).",
    )

    @property
    def images_per_call(self) -> int:
        """batch_size, once sized (JobSpec.sized)."""
        return _sized(self.batch_size, "batch_size")

    @property
    def files_per_read_task(self) -> int:
        """read_batch_size, once sized (JobSpec.sized)."""
        return _sized(self.read_batch_size, "read_batch_size")

    @property
    def fewest_units_compiled(self) -> int | None:
        """The shortest run (units to process) that compiles: compile_min_inputs with compile
        on (below compile_min_inputs_cold, only on nodes that compiled the model before), None
        with it off (the pipeline's `compiled_if_it_pays` applies it; `predict_in: auto` keeps
        such a run off the driver, which never compiles)."""
        return self.compile_min_inputs if self.compile else None

    def numerics(self, gpu_share: float) -> str:
        """What of the runtime decides the model's numbers, for actors holding `gpu_share`
        GPUs: the device, autocast on it (ignored on a CPU) and where images are decoded (the
        device's decoder and Pillow give other pixels), e.g. `cuda autocast=float16
        decode=tasks`. Compiling is left out: a run may compile on some nodes and not others,
        and it moves scores by float rounding only."""
        device = "cuda" if gpu_share and self.device != "cpu" else "cpu"
        autocast = self.autocast if device == "cuda" else "off"
        return f"{device} autocast={autocast} decode={self.decode}"

    @field_validator("num_gpus_per_actor", "num_cpus_per_actor")
    @classmethod
    def _within_rays_precision(cls, value: float | None) -> float | None:
        """Ray counts a resource in units of 0.0001 and refuses an actor asking for less than
        one (its resource options' check): refused here, before any work."""
        if value and value < RAY_RESOURCE_UNIT:
            raise ValueError(
                f"below Ray's smallest resource unit; expected 0 or at least {RAY_RESOURCE_UNIT:g}"
            )
        return value

    @model_validator(mode="after")
    def _pool_bounds_in_order(self) -> RuntimeSpec:
        smallest = self.min_actors or 1
        if self.max_actors is not None and self.max_actors < smallest:
            raise ValueError(
                f"max_actors: expected at least min_actors ({smallest}), found {self.max_actors}"
            )
        return self


# What JobSpec.fingerprint leaves out: settings that decide no row's values.
ROWS_UNDECIDED: dict[str, Any] = {
    "run": True,
    "runtime": True,
    "monitor": True,
    "evaluate": True,
    "output": {"rows_per_file"},
}
RAY_RESOURCE_UNIT = 0.0001  # Ray's precision for fractional resources (CPU, GPU)


def _sized(value: int | None, name: str) -> int:
    if value is None:
        raise RuntimeError(f"runtime.{name} is derived when the spec is sized: call JobSpec.sized")
    return value


# Iceberg table identifiers: `namespace.table` (nested namespaces a.b.table).
ICEBERG_TABLE_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$"
# Catalog property name parts that carry secrets (pyiceberg's `credential`, `token`,
# `s3.secret-access-key`, `glue.session-token`, `adls.sas-token`, `adls.connection-string`
# (it holds AccountKey=), a REST catalog's `header.Authorization` ...).
CATALOG_SECRET_PARTS = (
    "credential", "token", "secret", "password", "access-key", "account-key", "sas",
    "connection-string", "authorization", "cookie", "api-key", "apikey",
)  # fmt: skip


class OutputSpec(StrictModel):
    format: Literal["parquet", "iceberg"] = Field(
        default="parquet",
        description="parquet: Hive-partitioned files under `uri`, a manifest per run; "
        "iceberg: one snapshot per run in the catalog's table `table` (vision_ops.outputs).",
    )
    uri: Uri = Field(
        description="parquet: the table root, rows under run_date=YYYY-MM-DD/. iceberg: the "
        "folder beside the table for staged rows, segmentation masks and evaluation metrics, "
        "each table's in a folder of its own (uri/namespace.table); the committed rows go "
        "where the catalog puts the table."
    )
    rows_per_file: int = Field(default=250_000, gt=0, description="Rows per Parquet file.")

    table: str | None = Field(
        default=None,
        pattern=ICEBERG_TABLE_PATTERN,
        description="iceberg: the table as namespace.table, created on the first run.",
    )
    catalog: dict[str, str] = Field(
        default_factory=dict,
        description="iceberg: PyIceberg catalog properties (type: rest | glue | sql | hive "
        "..., uri, warehouse, ...). Never credentials: those come from the standard chains.",
    )

    @field_validator("uri")
    @classmethod
    def _known_protocol(cls, value: str) -> str:
        return known_protocol(value)

    @field_validator("catalog")
    @classmethod
    def _no_catalog_secrets(cls, value: dict[str, str]) -> dict[str, str]:
        for name, setting in value.items():
            lowered = name.lower().replace("_", "-")
            if any(part in lowered for part in CATALOG_SECRET_PARTS):
                raise ValueError(
                    f"catalog.{name} looks like a credential; credentials never go in the spec: "
                    "the catalog and its storage use the standard AWS/GCP/Azure chains "
                    "(environment, profile, instance role)"
                )
            if _has_credentials(setting):
                raise ValueError(f"catalog.{name}: {CREDENTIALS_IN_URI}")
        if "type" in value:
            _known_catalog_type(value["type"])
        return value

    @model_validator(mode="after")
    def _format_fields(self) -> OutputSpec:
        if self.format == "iceberg":
            missing = [name for name in ("table", "catalog") if not getattr(self, name)]
            if missing:
                raise ValueError(
                    f"format: iceberg expects {' and '.join(missing)} "
                    "(table: namespace.table, catalog: PyIceberg catalog properties), found none"
                )
        elif self.table is not None or self.catalog:
            raise ValueError(
                "table and catalog are for format: iceberg; found them with format: parquet"
            )
        return self

    @property
    def files_uri(self) -> str:
        """Where a run's own files go (staged rows, segmentation masks, run indexes, evaluation
        metrics): the table's root for Parquet; for Iceberg, a folder of the table's own under
        `uri` (`uri`/namespace.table), so tables sharing one `uri` never touch each other's
        files, even under one run id."""
        if self.format == "iceberg":
            return f"{self.uri.rstrip('/')}/{self.table}"
        return self.uri


def _known_catalog_type(name: str) -> None:
    """A catalog type PyIceberg has (it lower-cases it); ValueError listing them if not. Not
    checked without PyIceberg: a machine that submits the job need not have it (`run` and
    `validate` refuse a spec of an Iceberg table where it is missing: `require_pyiceberg`)."""
    try:
        from pyiceberg.catalog import CatalogType  # only for specs that name an Iceberg catalog
    except ImportError:
        return

    known = [kind.value for kind in CatalogType]
    if name.lower() not in known:
        raise ValueError(f"catalog.type: expected one of {', '.join(known)}; found {name!r}")


def utc_today() -> dt.date:
    return dt.datetime.now(dt.timezone.utc).date()


class RunSpec(StrictModel):
    id: str | None = Field(
        default=None,
        pattern=RUN_ID_PATTERN,
        description="Run id in file names and rows; defaults to the run date plus the spec hash.",
    )
    date: dt.date | None = Field(default=None, description="Partition date; defaults to today UTC.")
    incremental: bool = Field(
        default=False,
        description="Skip units committed by earlier runs for the same model fingerprint and "
        "input version (ETag, else size + mtime); an input whose latest rows hold an error is "
        "processed again (see skip_errors).",
    )
    skip_errors: list[str] = Field(
        default_factory=list,
        description="Error types an incremental run counts as done, e.g. [NotAnImage, NotDicom, "
        "ImageTooLarge]; every other error row's input is processed again.",
    )
    lock_lease_s: int = Field(
        default=6 * 3600,
        ge=60,
        description="Lease of the table's run lock: a lock older than this is taken over. The "
        "holder renews it a quarter lease apart, each renewal a write to the store: a lease of "
        "seconds would lapse on one slow write, so at least 60.",
    )


class MonitorSpec(StrictModel):
    """How far a run may move from the runs before it before `vision-ops report --check`
    fails (exit 6): population stability indexes (README, Drift alerts) and the error rate."""

    runs: int = Field(
        default=3, ge=1, description="Earlier committed runs a run is compared with (pooled)."
    )
    label_psi: float = Field(
        default=0.25,
        gt=0,
        description="Highest PSI of the label distribution accepted (0.1: a small shift, "
        "0.25 and over: a large one).",
    )
    score_psi: float = Field(
        default=0.25,
        gt=0,
        description="Highest PSI of the score distribution (10 equal bins over [0, 1]) accepted.",
    )
    error_rate_rise: float = Field(
        default=0.05,
        ge=0,
        description="Highest rise of the error rate (error rows / units sent to the model: "
        "a scene's tiles with no data left out) over the earlier "
        "runs' pooled rate accepted, e.g. 0.05: five points.",
    )
    min_units: int = Field(
        default=5,
        ge=1,
        description="Fewest units the model answered (status ok) a run, and the earlier runs "
        "pooled, must hold for their label and score distributions to be compared: a PSI over "
        "fewer (a quiet --incremental night of a few changed files) is noise, so it is not "
        "compared and says so. The error rate is compared whatever the count.",
    )


class EvaluateSpec(StrictModel):
    """The labelled hold-out a scheduled run is scored against after it commits (`vision-ops
    evaluate SPEC`), and the floors its overall metrics must reach."""

    truth: Uri | None = Field(
        default=None,
        description="The hold-out's ground truth, as `evaluate --truth` takes it: labels "
        "CSV/Parquet (uri, label), COCO JSON, or a folder of PNG class-id masks; its images "
        "are among the run's inputs. Unused for truth_format imagefolder.",
    )
    truth_format: str | None = Field(
        default=None,
        description="As `evaluate --truth-format`; default: the run's task's first (classification "
        "table, detection coco, segmentation masks).",
    )
    min: dict[str, float] = Field(
        default_factory=dict,
        description="Overall metric -> the lowest value accepted, e.g. {accuracy: 0.8, "
        "top5_accuracy: 0.95}; `evaluate` exits 5 when one falls below.",
    )

    @model_validator(mode="after")
    def _truth_given(self) -> EvaluateSpec:
        if self.truth is None and self.truth_format != "imagefolder":
            raise ValueError(
                "evaluate.truth: expected the hold-out's ground truth (a URI), found none "
                "(only truth_format: imagefolder takes the labels from the folders)"
            )
        return self


# why tiled detection (JobSpec.merges_scene_rows) runs its model in actors, never the driver's
MERGED_AFTER_THE_POOL = "a tiled scene's detections are merged in Ray after the actor pool"


class JobSpec(StrictModel):
    input: InputSpec = Field(description="What to read: files, folders, globs or a manifest.")
    task: SerializeAsAny[TaskSettings] = Field(
        default_factory=lambda: task_settings({}),
        description="What to predict: `kind` names a registered task (default: classification); "
        "the rest are that task's settings.",
    )
    model: ModelSpec = Field(description="The model: `kind` names how it is built and loaded.")
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec, description="The actor pool, batches and decoding."
    )
    output: OutputSpec = Field(
        description="Where the rows go: a Parquet table or an Iceberg table."
    )
    run: RunSpec = Field(
        default_factory=RunSpec,
        description="The run's identity (id, date) and whether it skips units committed before.",
    )
    evaluate: EvaluateSpec | None = Field(
        default=None,
        description="A labelled hold-out the scheduled job scores each run against, with the "
        "metric floors that fail it (`vision-ops evaluate SPEC`).",
    )
    monitor: MonitorSpec = Field(
        default_factory=MonitorSpec,
        description="Drift thresholds `vision-ops report SPEC --check` holds each run to; "
        "each run records its figures against them in its manifest (`drift`).",
    )
    storage_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="fsspec options per protocol, e.g. {s3: {endpoint_url: ...}}. "
        "Never credentials: those come from the standard AWS/GCP/Azure chains.",
    )

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for protocol, options in value.items():
            if protocol not in fsspec.available_protocols():  # a URI's options go by its own
                raise ValueError(
                    f"{protocol}: not a protocol fsspec knows, so its options would apply to "
                    "nothing; expected a URI's protocol as written, e.g. s3, gs, az, file"
                )
            for path in _credential_paths(options):
                raise ValueError(
                    f"{protocol}.{path} looks like a credential; credentials never go in the "
                    "spec: use the standard AWS/GCP/Azure credential chain (environment, "
                    "profile, instance role)"
                )
        return value

    @field_validator("task", mode="before")
    @classmethod
    def _registered_task(cls, value: Any) -> TaskSettings:
        return task_settings(value)

    @model_validator(mode="before")
    @classmethod
    def _task_default_model(cls, value: Any) -> Any:
        """A job without a model runs its task's default model, where the task has one (OCR:
        the packaged PP-OCR pair); a model section without a `kind` is that default's, with
        its fields, unless they are all another kind's (`model: {dictionary: ...}` for OCR was
        read as a torchvision model missing its architecture)."""
        if not isinstance(value, dict):
            return value
        record = _task_record(value.get("task") or {})
        default = None if record is None else record.default_model
        given = value.get("model")
        if default is None or not (given is None or _of_the_default_kind(given, default["kind"])):
            return value
        return value | {"model": dict(default) | (given or {})}

    @model_validator(mode="after")
    def _task_runs_the_model_kind(self) -> JobSpec:
        record = _task_record(self.task)
        assert record is not None, "a validated task section names a registered task"
        kinds = record.model_kinds
        if self.model.kind not in kinds:
            raise ValueError(
                f"model.kind: task {self.task.kind} runs model.kind {' or '.join(kinds)}; "
                f"found {self.model.kind}"
            )
        return self

    @model_validator(mode="after")
    def _evaluate_fits_the_task(self) -> JobSpec:
        """A hold-out the task's scorer can read, and floors on the metrics it gives: found
        now, not after the run commits."""
        from vision_ops.tasks import get_task

        held, task = self.evaluate, get_task(self.task.kind)
        if held is None:
            return self
        if task.scorer is None:
            raise ValueError(f"evaluate: {task.name} runs cannot be scored; remove evaluate")
        if held.truth_format is not None and held.truth_format not in task.truth_formats:
            raise ValueError(
                f"evaluate.truth_format: a {task.name} run is scored against "
                f"{' or '.join(task.truth_formats)}, found {held.truth_format}"
            )
        unknown = sorted(set(held.min) - set(task.metrics))
        not_given = self.task.metrics_not_given()
        if unknown:
            floors = [m for m in task.metrics if m != NO_FLOOR and m not in not_given]
            raise ValueError(
                f"evaluate.min names {', '.join(unknown)}: expected one of {', '.join(floors)}"
            )
        _floors_that_can_hold(held.min, task.counted_metrics)
        for name in sorted(held.min.keys() & not_given.keys()):
            raise ValueError(
                f"evaluate.min.{name}: a run gives none where {not_given[name]}; expected no "
                "floor on it, or a task that keeps what it scores"
            )
        return self

    @model_validator(mode="after")
    def _driver_needs_no_merge(self) -> JobSpec:
        if self.runtime.predict_in == "driver" and self.merges_scene_rows:
            raise ValueError(
                "runtime.predict_in: driver hands each batch's rows straight to the table; "
                f"{MERGED_AFTER_THE_POOL}: expected predict_in: actors"
            )
        return self

    @model_validator(mode="after")
    def _in_process_where_it_can(self) -> JobSpec:
        found = self.ray_needed_for()
        if self.runtime.runner == "in_process" and found is not None:
            raise ValueError(
                "runtime.runner: in_process runs the job in this one process, on its CPUs; "
                f"{found}: expected runner: ray (or auto)"
            )
        return self

    def ray_needed_for(self) -> str | None:
        """What of the spec needs Ray (`IN_PROCESS_RULED_OUT`), as found; None: nothing."""
        runtime = self.runtime
        if self.input.manifest is not None:
            return "the inputs include a manifest, which Ray Data reads"
        if self.input.dicom is not None:
            return "a DICOM instance's frames are read in blocks that Ray Data streams"
        if self.input.tiling is not None:
            return "its scenes are cut into tiles, planned in Ray tasks"
        if runtime.device == "cuda" or (runtime.num_gpus_per_actor or 0) > 0:
            return "the model is asked onto a GPU"
        if runtime.autoscaling:
            return "runtime.autoscaling is set"
        return None

    @property
    def merges_scene_rows(self) -> bool:
        """Tiled detection: a scene's rows are merged after the predictors (boxes that cross
        a seam between tiles)."""
        return self.input.tiling is not None and self.task.kind == "detection"

    @model_validator(mode="after")
    def _device_decode_needs_a_fixed_size(self) -> JobSpec:
        from vision_ops.tasks import get_task

        if self.runtime.decode == "device" and get_task(self.task.kind).input_size == "any":
            raise ValueError(
                "runtime.decode: device decodes photos and crops them to the model's fixed "
                f"input (classification, segmentation); {self.task.kind} reads images at their "
                "own size: expected decode: tasks"
            )
        return self

    def sized(self, gpu_share: float) -> JobSpec:
        """This spec with the batch sizes it leaves out derived for an actor holding
        `gpu_share` GPUs (0: CPUs only); the sizes it sets are kept."""
        runtime = self.runtime
        batch = runtime.batch_size or default_batch_size(self.task.kind, gpu_share)
        read = runtime.read_batch_size or (
            batch * DEVICE_DECODE_READ_BATCHES if runtime.decode == "device" else READ_BATCH_SIZE
        )
        sized = runtime.model_copy(update={"batch_size": batch, "read_batch_size": read})
        return self.model_copy(update={"runtime": sized})

    def resolved_run(self) -> tuple[str, dt.date]:
        """The run id and date, with their defaults filled in (the date: today, UTC)."""
        date = self.run.date or utc_today()
        return self.run.id or self.default_run_id(date), date

    def default_run_id(self, date: dt.date) -> str:
        """The run id of a date where none is given: the date and the spec's digest."""
        return f"{date.isoformat()}-{self.fingerprint()[:8]}"

    def pinned(self) -> JobSpec:
        """The spec with its run id and date filled in once: a run that crosses midnight UTC
        keeps the identity it started with (its lock, rows, masks and manifest agree)."""
        run_id, date = self.resolved_run()
        return self.model_copy(
            update={"run": self.run.model_copy(update={"id": run_id, "date": date})}
        )

    def fingerprint(self) -> str:
        """A hash of what decides the rows: not the run identity, the sizing, the drift and
        evaluation settings, nor how many rows a file holds (the numerics the runtime decides
        are apart: RuntimeSpec.numerics)."""
        content = self.model_dump(mode="json", exclude=ROWS_UNDECIDED)
        if self.input.tiling is not None:  # unset bands as [1, 2, 3]: the digest of before
            content["input"]["tiling"] = self.input.tiling.fingerprinted()
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _credential_paths(options: Any, prefix: str = "") -> list[str]:
    """The options named like a credential (`names_a_credential`: `session_token`, an
    `X-Api-Key` header, s3fs's `SSECustomerKey`), or holding a URL with a user or password in
    it, in nested options and lists of them alike."""
    if isinstance(options, list | tuple):
        items = [(str(index), value) for index, value in enumerate(options)]
    elif isinstance(options, dict):
        items = [(str(name), value) for name, value in options.items()]
    else:
        return []
    found = []
    for name, value in items:
        if names_a_credential(name) or _has_credentials(value):
            found.append(f"{prefix}{name}")
        else:
            found.extend(_credential_paths(value, f"{prefix}{name}."))
    return found


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML spec, apply `dotted.path=value` overrides, validate (SpecError if it cannot)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(f"spec file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"spec file {path}: cannot read: {err}") from None
    raw = _yaml_value(text, f"spec file {path}")
    if not isinstance(raw, dict):
        raise SpecError(f"spec file {path}: expected a mapping, found {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    return parse_spec(raw)


NO_FLOOR = "error_rows"  # failures: `vision-ops run --max-error-ratio` bounds them


def _floors_that_can_hold(floors: dict[str, float], counted: Sequence[str]) -> None:
    """ValueError for an `evaluate.min` floor no run can meet the way it was meant: on
    `error_rows` (a floor on failures fails a clean run: `vision-ops run --max-error-ratio`
    bounds them), or a share's outside [0, 1] (every metric but the `counted` ones)."""
    if NO_FLOOR in floors:
        raise ValueError(
            "evaluate.min.error_rows: error rows are failures, and a floor on them fails a run "
            "with fewer; expected no floor (`vision-ops run --max-error-ratio` bounds them)"
        )
    for name, floor in floors.items():
        if name not in counted and not 0 <= floor <= 1:
            raise ValueError(
                f"evaluate.min.{name}: {floor} is no share; expected a value from 0 to 1 "
                f"(e.g. 0.8 for 80%)"
            )


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a mapping that names a key twice (the second would
    silently replace the first: two `runtime:` sections, say)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(
                    None, None, "found a list or mapping as a key", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"found {key!r} twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_value(text: str, where: str) -> Any:
    """YAML text parsed; SpecError naming `where` (never quoting the text: a value may be a
    secret) if it is not YAML, holds an impossible date, or nests past Python's recursion."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{where}: not valid YAML: {err.problem}{at}") from None
    except ValueError as err:  # YAML, but a value its type refuses
        if "'" in str(err) or '"' in str(err):  # int() and float() quote it (`!!int abc`)
            raise SpecError(
                f"{where}: not valid YAML: a value is not of the type it is tagged"
            ) from None
        raise SpecError(f"{where}: not a valid date ({err}); expected YYYY-MM-DD") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{where}: not valid YAML: {err}") from None
    except RecursionError:
        raise SpecError(f"{where}: nested too deeply") from None


def parse_spec(raw: dict[str, Any]) -> JobSpec:
    try:
        return _validated(raw)
    except RecursionError:  # e.g. a YAML alias inside itself, which pydantic follows forever
        raise SpecError("invalid job spec: nested too deeply (an alias inside itself?)") from None


def _validated(raw: dict[str, Any]) -> JobSpec:
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_validation_error(err)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`64`, `[a, b]`, `null`)."""
    dotted, sep, text = override.partition("=")
    if not sep:  # no value to keep out of the message
        raise SpecError(f"--set {override!r}: expected KEY.PATH=VALUE")
    if not dotted.strip():
        raise SpecError("--set: expected KEY.PATH=VALUE, found no KEY.PATH before the =")
    value = _yaml_value(text, f"--set {dotted.strip()}")
    *parents, leaf = dotted.strip().split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {dotted.strip()}: {name} is not a mapping")
        node = child
    node[leaf] = value


# What each field pattern asks for, in words: a message names it, not the regex.
PATTERN_MEANINGS = {
    RUN_ID_PATTERN: "expected 1 to 128 letters, digits, '.', '_' or '-', the first a letter or "
    "digit",
    SHA256_PATTERN: "expected a SHA-256 as 64 lower-case hex digits",
    ENTRYPOINT_PATTERN: "expected package.module:function",
    ICEBERG_TABLE_PATTERN: "expected namespace.table (nested namespaces a.b.table; letters, "
    "digits and '_', not starting with a digit)",
}


def format_validation_error(err: ValidationError) -> str:
    lines = [f"invalid job spec ({err.error_count()} problem(s)):"]
    for problem in err.errors():
        location = _location(problem["loc"])
        message = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "string_pattern_mismatch":
            message = PATTERN_MEANINGS.get(problem["ctx"]["pattern"], message)
        if not location:  # a check across sections (a JobSpec validator): its message names
            lines.append(f"  {message}")  # the fields, and its input is the whole spec
            continue
        line = f"  {location}: {message}"
        secret_prone = "storage_options" in location or location.endswith("output.catalog")
        if "input" in problem and not secret_prone and "found" not in message:
            line += f" (found: {_found(problem['loc'], problem['input'])})"
        lines.append(line)
    return "\n".join(lines)


def _location(loc: tuple[int | str, ...]) -> str:
    """The dotted field path, less the union tag pydantic puts after a field (UNION_TAGS)."""
    parts = [
        str(part)
        for index, part in enumerate(loc)
        if not (index and part in UNION_TAGS.get(str(loc[index - 1]), ()))
    ]
    return ".".join(parts)


def _found(loc: tuple[int | str, ...], value: Any) -> str:
    """The offending value for the message, with credential values masked wherever they sit."""
    if loc and names_a_credential(str(loc[-1])):
        return "'***'"
    return _short_repr(_redacted(value))


def _redacted(value: Any) -> Any:
    """A copy of `value` with whatever sits under a credential-named key replaced by ***."""
    if isinstance(value, dict):
        return {
            name: "***" if names_a_credential(str(name)) else _redacted(item)
            for name, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redacted(item) for item in value]
    return masked_url(value) if _has_credentials(value) else value


def _short_repr(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _has_credentials(value: Any) -> bool:
    """A URL holding credentials (storage.holds_credentials): they would reach logs and errors."""
    return isinstance(value, str) and holds_credentials(value)
