"""DICOM Segmentation (SEG) output, written by highdicom: what PACS, OHIF, 3D Slicer and research archives read.

One segment per class, BINARY, each with the SNOMED CT codes of its name (terminology.py) and its display colour.
The source images are the DICOM series the segmentation was computed on: the SEG references each of their
instances, copies their patient and study, and places its frames on their planes. Before writing, each source
slice is checked to lie exactly where the volume's slice of the same index lies (the masks are never resampled).
A DICOM SEG is written whole and atomically; adding segments to an existing one is not supported.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import atomic_write
from .segmentation_io import Segment, check_color, check_header_text
from .terminology import resolve as resolve_terminology
from .toolbox import one_line
from .volume import Volume, dicom_series_files

MAX_LABEL_LENGTH = 64  # Segment Label is a DICOM LO
MANUFACTURER = "SegMoTE"
SERIES_NUMBER = 7001  # a high series number keeps the SEG after the images in a viewer's series list


def check_available() -> None:
    """DICOM SEG needs highdicom (the `dicom` extra); checked before any model runs."""
    if importlib.util.find_spec("highdicom") is None:
        raise InputError("DICOM SEG output needs highdicom: pip install 'segmote[dicom]'")


def check_source(image: str | Path) -> Path:
    """The input must be a DICOM series folder: a SEG references the instances it segments."""
    image = Path(image)
    if not image.exists():
        raise InputError(f"image not found: {image}")
    if not image.is_dir():
        raise InputError(f"DICOM SEG output needs a DICOM series folder as input (the SEG references its images); "
                         f"{image.name} is not one: choose --output-format seg.nrrd or nifti")
    return image


def check_label(name: str) -> str:
    """A segment name a DICOM Segment Label (LO) holds exactly: a valid header text, at most 64 characters, no
    backslash (DICOM's value separator)."""
    check_header_text(name)
    if len(name) > MAX_LABEL_LENGTH:
        raise InputError(f"segment name '{name[:40]}...' is {len(name)} characters long; a DICOM segment label "
                         f"holds at most {MAX_LABEL_LENGTH}")
    if "\\" in name:
        raise InputError(f"segment name '{name}' holds a backslash, which separates values in DICOM")
    return name


def _source_datasets(folder: Path, series: str | None, volume: Volume) -> list:
    """The series' instances in voxel-slice order, each checked to lie on the volume's slice of that index."""
    import pydicom

    _, files = dicom_series_files(folder, series)
    if len(files) != volume.array.shape[0]:
        raise InputError(f"DICOM series in {folder.name} has {len(files)} images for a volume of "
                         f"{volume.array.shape[0]} slices; cannot reference them one to one")
    datasets = []
    rows, columns = volume.array.shape[1:]
    for k, name in enumerate(files):
        try:
            dataset = pydicom.dcmread(name, stop_before_pixels=True)
            position = np.asarray(dataset.ImagePositionPatient, float)
            orientation = np.asarray(dataset.ImageOrientationPatient, float)
            size = (int(dataset.Rows), int(dataset.Columns))
        except (OSError, AttributeError, ValueError, TypeError, pydicom.errors.InvalidDicomError) as error:
            raise InputError(f"DICOM image {Path(name).name} cannot be referenced: {type(error).__name__}: "
                             f"{str(error)[:100]}") from None
        expected = volume.ijk_to_lps @ np.array([0.0, 0.0, k, 1.0])
        if (size != (rows, columns) or not np.allclose(position, expected[:3], atol=1e-3)
                or not np.allclose(orientation, volume.direction[:, :2].T.reshape(-1), atol=1e-4)):
            raise InputError(f"DICOM image {Path(name).name} does not lie on slice {k} of the volume read from "
                             f"{folder.name}; the SEG would misplace its masks")
        datasets.append(dataset)
    return datasets


def write_dicom_seg(path: str | Path, volume: Volume, segments: list[Segment], source_folder: str | Path,
                    series: str | None = None, automatic: bool = False) -> list[int]:
    """Write `segments` (masks on `volume`'s grid) as one DICOM SEG at `path`, replacing any file there, atomically;
    returns the voxels stored per segment. source_folder/series: the DICOM series `volume` was read from."""
    check_available()
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from . import __version__

    path = Path(path)
    if not segments:
        raise InputError("no segments to write")
    names = []
    for segment in segments:
        check_label(segment.name)
        if segment.name in names:
            raise InputError(f"two new segments are both named '{segment.name}'")
        if segment.mask.shape != volume.array.shape:
            raise InputError(f"segment '{segment.name}' has shape {segment.mask.shape}, image {volume.array.shape}")
        names.append(segment.name)
    sources = _source_datasets(Path(source_folder), series, volume)
    algorithm = hd.AlgorithmIdentificationSequence(name="SegMoTE", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, segment in enumerate(segments, start=1):
        entry = resolve_terminology(segment.name).entry
        color = check_color(segment.color, segment.name) if segment.color is not None else entry.color
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.name,
            segmented_property_category=hd.sr.CodedConcept(entry.category.value, entry.category.scheme,
                                                           entry.category.meaning),
            segmented_property_type=hd.sr.CodedConcept(entry.type.value, entry.type.scheme, entry.type.meaning),
            algorithm_type=(hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if automatic
                            else hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC),
            algorithm_identification=algorithm,
            display_color=(hd.color.CIELabColor.from_rgb(*(round(c * 255) for c in color)) if color else None),
        )
        if entry.modifier is not None:  # nested in the type item (Segment Description Macro); highdicom has no argument
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(entry.modifier.value, entry.modifier.scheme, entry.modifier.meaning)]
        descriptions.append(description)
    # The volume's spacing (checked against the source positions above), rounded to 10 decimals so that it prints
    # as a valid DICOM decimal string (16 characters at most) even where a source's own value does not
    # ("9.999999999999996" would be copied as the invalid "10.00000000000000").
    spacing = [round(float(v), 10) for v in volume.spacing]
    thickness = sources[0].get("SliceThickness")
    measures = hd.PixelMeasuresSequence(pixel_spacing=[spacing[1], spacing[0]],
                                        slice_thickness=round(float(thickness), 10) if thickness else spacing[2],
                                        spacing_between_slices=spacing[2])
    masks = np.stack([np.asarray(segment.mask, bool) for segment in segments], axis=-1).astype(np.uint8)
    log = logging.getLogger("highdicom")
    level = log.level
    log.setLevel(logging.ERROR)  # its notes (e.g. on an all-empty mask) would read as problems on the command line
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name="SegMoTE",
            software_versions=__version__,
            device_serial_number="none",
            content_label="SEGMOTE",
            content_description="SegMoTE segmentation",
            series_description="SegMoTE segmentation",
            pixel_measures=measures,
        )
    except (ValueError, AttributeError, TypeError, KeyError) as error:  # highdicom's view of unusual source series
        raise InputError(f"cannot build a DICOM SEG on this series: {one_line(error, 180, named=True)}") from None
    finally:
        log.setLevel(level)
    atomic_write(path, lambda temporary: seg.save_as(temporary, enforce_file_format=True))
    return [int(np.count_nonzero(segment.mask)) for segment in segments]
