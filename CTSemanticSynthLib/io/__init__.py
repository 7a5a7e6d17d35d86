"""Read and write CT volumes and label maps (NIfTI, NRRD, MetaImage, DICOM series, Slicer .seg.nrrd).

Arrays are in voxel order (I, J, K), i.e. ``array[i, j, k]``, and travel with a 4x4 affine that maps
voxel (i, j, k, 1) to RAS millimetres. SimpleITK (LPS, (k, j, i) arrays) is only used inside this
package; :func:`lps_to_ras_affine` and :func:`ras_affine_to_lps` are the only places that convert.
Every file the library writes goes through :func:`atomic_outputs`. Import the public names from here:

- ``volume``: :class:`Volume`, :func:`describe_geometry`, the LPS <-> RAS conversion, SimpleITK <-> Volume.
- ``read``: :func:`read_image`, :func:`read_ct` (refuses a label map), :func:`read_metadata` (files and DICOM
  series folders).
- ``complete``: :func:`verify_complete` (truncated or damaged data) and the NaN/inf check; the only nibabel user.
- ``labelmap``: :func:`read_labelmap` (integer checks, Slicer .seg.nrrd segments merged into one map).
- ``atomic``: write safety: :func:`atomic_outputs`, :func:`atomic_folder`, :func:`write_bytes`, output-path checks,
  :func:`commit_log` (which outputs went in before an interrupt).
- ``write``: :func:`write_volume`, :func:`save_volume` (written through ``atomic``, read back to verify).
"""

from .atomic import (atomic_folder, atomic_outputs, check_distinct_paths, check_output_path, commit_log,
                     remove_stale_temps, temp_sibling, write_bytes)
from .complete import verify_complete
from .labelmap import read_labelmap
from .read import READ_SUFFIXES, read_ct, read_image, read_metadata
from .volume import Volume, describe_geometry, lps_to_ras_affine, ras_affine_to_lps, sitk_to_volume, volume_to_sitk
from .write import WRITE_SUFFIXES, save_volume, write_volume

__all__ = ["READ_SUFFIXES", "WRITE_SUFFIXES", "Volume", "atomic_folder", "atomic_outputs", "check_distinct_paths",
           "check_output_path", "commit_log", "describe_geometry", "lps_to_ras_affine", "ras_affine_to_lps",
           "read_ct", "read_image", "read_labelmap", "read_metadata", "remove_stale_temps", "save_volume",
           "sitk_to_volume", "temp_sibling", "verify_complete", "volume_to_sitk", "write_bytes", "write_volume"]
