"""GeoPurify: student affinity network + geometry-guided pooling for fused VLM voxel features.

See docs/GEOPURIFY.md. Heavy submodules are imported lazily by callers (`from geopurify_ros.purify.purifier
import Purifier`); this package only re-exports the main names.
"""
from .pooling import geometry_guided_pooling, incremental_pooling  # noqa: F401
from .purifier import Purifier, PurifyConfig, PurifyStats, purify_tensors  # noqa: F401
from .student import StudentAffinityNet, load_student  # noqa: F401
