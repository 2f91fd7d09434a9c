"""pip / editable install of the pure-Python part of geopurify_ros.

On a full ROS 2 install the package is built by colcon as an ament_cmake package (CMakeLists.txt);
this file serves the venv set-up (scripts/setup.sh) and provides the console scripts.
"""
from setuptools import find_packages, setup

setup(
    name="geopurify_ros",
    version="0.1.0",
    description="Online open-vocabulary 3D semantic mapping with GeoPurify for ROS 2",
    license="Apache-2.0",
    packages=find_packages(include=["geopurify_ros", "geopurify_ros.*"]),
    package_data={"geopurify_ros": ["data/*.txt", "data/*.yaml", "data/*.json", "data/*.tsv", "features/*.txt", "models/*.pt", "models/*.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "mapping_node = geopurify_ros.node.mapping_node:main",
            "geopurify-mapping = geopurify_ros.node.mapping_node:main",
            "geopurify-make-demo = geopurify_ros.data.make_demo:main",
            "geopurify-train = geopurify_ros.purify.train:main",
            "geopurify-train-features = geopurify_ros.features.train_lseg:main",
            "geopurify-pretrain-teacher = geopurify_ros.purify.pretrain:main",
            "geopurify-ablation = geopurify_ros.eval.ablation:main",
            "geopurify-probe = geopurify_ros.purify.probe:main",
            "geopurify-eval = geopurify_ros.eval.cli:main",
            "geopurify-query = geopurify_ros.node.query_client:main",
            "geopurify-export = geopurify_ros.export:main",
        ]
    },
)
