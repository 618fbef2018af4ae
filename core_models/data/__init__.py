"""Site data layer: a hospital's folder (``manifest.csv`` and images as its PACS exported them) to grayscale images in
[0, 1] (or RGB ones, ``channels=3``), integer labels, the surviving manifest rows with acquisition metadata, and a Rejection for every bad row or
file. One bad file or row never stops a site; whole-site problems raise ManifestError.

Submodules, in import order (each imports only those above it):

- ``limits``: ImageLimits, the errors (ManifestError, ImageError, DecoderMissing), non-blocking regular-file opening
- ``pixels``: META_COLUMNS, size checks, normalise / grey-from-RGB / resize shared by every reader
- ``manifest``: manifest reading (normalised once: manifest_table), validation, Rejection, read_manifest,
  write_rejected
- ``dicom_intensity``: modality / VOI LUT to [0, 1], with its table cache
- ``dicom``: DICOM header checks, lean and full reads, pixel decoding, luminance; read_dicom, parse_dicom_age
- ``images``: the Pillow path and read_image (dispatch by suffix / DICOM magic)
- ``npz``: MedMNIST load_npz
- ``cache``: the decoded-site cache (``.equifed_cache/``)
- ``volumes``: CT / MR volumes (DICOM series folders, NIfTI files): VolumeSettings, read_volume
- ``site``: SiteData and load_site (volume=VolumeSettings(...) for volume sites)
- ``boxes``: a site's optional lesion boxes (``boxes.csv``): load_boxes, rescale_boxes to the model's input size
"""

from core_models.data.boxes import boxes_by_patient, load_boxes, rescale_boxes
from core_models.data.cache import CACHE_DIR
from core_models.data.dicom import parse_dicom_age, read_dicom
from core_models.data.images import read_image
from core_models.data.limits import DEFAULT_LIMITS, MULTI_FRAME, DecoderMissing, ImageError, ImageLimits, ManifestError
from core_models.data.manifest import Rejection, manifest_patients, manifest_table, read_manifest, write_rejected
from core_models.data.npz import load_npz
from core_models.data.pixels import META_COLUMNS
from core_models.data.site import SiteData, load_site
from core_models.data.volumes import WINDOWS, VolumeSettings, read_volume

__all__ = [
    "CACHE_DIR",
    "DEFAULT_LIMITS",
    "META_COLUMNS",
    "MULTI_FRAME",
    "DecoderMissing",
    "ImageError",
    "ImageLimits",
    "ManifestError",
    "Rejection",
    "SiteData",
    "VolumeSettings",
    "WINDOWS",
    "boxes_by_patient",
    "load_boxes",
    "load_npz",
    "load_site",
    "manifest_patients",
    "manifest_table",
    "parse_dicom_age",
    "read_dicom",
    "read_image",
    "read_manifest",
    "read_volume",
    "rescale_boxes",
    "write_rejected",
]
