"""Demo data: Sweet Home 3D furniture rendered into labelled RGB-D ROS 2 bags (see make_demo).

``load_sequence`` / ``load_ground_truth`` are re-exported lazily so importing the package stays cheap.
"""
__all__ = ["load_sequence", "load_ground_truth", "Frame", "GroundTruth"]


def __getattr__(name):
    if name in __all__:
        from . import sequence

        return getattr(sequence, name)
    raise AttributeError(name)
