"""geopurify_ros: online open-vocabulary 3D semantic mapping with GeoPurify.

The rosidl-generated interfaces (``geopurify_ros.msg``, ``geopurify_ros.srv``) may be installed in a
different site-packages directory than these sources (venv set-up: editable sources + colcon-built
interfaces). ``extend_path`` lets one ``geopurify_ros`` package span both directories.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
