"""internvl_ros: ament_python package.

Three Python packages are installed, each from the folder of its name: ``internvl_engine`` (the
ROS-free runtime; its model families in ``models/``, its tools in ``tools/``, which the runtime
never imports), ``internvl_toy`` (the toy model's scenes, training and evaluation) and
``internvl_ros`` (the ROS 2 node and its clients).
"""

from glob import glob

from setuptools import setup

PACKAGE = "internvl_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=[
        "internvl_engine",
        "internvl_engine.models",
        "internvl_engine.tools",
        "internvl_toy",
        PACKAGE,
    ],
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    extras_require={"test": ["pytest"]},  # colcon test runs pytest (not unittest) for this
    zip_safe=True,
    maintainer="internvl_ros developers",
    maintainer_email="dev@internvl-ros.local",
    description="InternVL2.5 vision-language answers for ROS 2 cameras (AX650N NPU or CPU).",
    license="BSD-3-Clause",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "internvl-infer = internvl_engine.cli:main",
            "internvl-doctor = internvl_engine.tools.doctor:main",
            "internvl-export = internvl_engine.tools.export:main",
            "internvl-export-native = internvl_engine.tools.native:main",
            "internvl-bench = internvl_engine.tools.bench:main",
            "internvl-bench-serve = internvl_engine.tools.bench_serve:main",
            "internvl-fidelity = internvl_engine.tools.fidelity:main",
            "internvl-serve = internvl_engine.serve:main",
            "internvl-make-tiny = internvl_engine.tools.make_tiny:main",
            "internvl-train-toy = internvl_toy.train:main",
            "internvl-eval-toy = internvl_toy.evaluate:main",
            "internvl_node = internvl_ros.cli:node_main",
            "internvl-make-bag = internvl_ros.bags:make_bag_main",
            "internvl-play-bag = internvl_ros.bags:play_bag_main",
            "internvl-ask = internvl_ros.cli:ask_main",
        ],
    },
)
