"""keras_sapa: SAPA (Similarity-Aware Point Affiliation) feature upsampling for Keras 3.

The compiled custom op is optional and built separately by ``custom_ops/build.py``
(``scripts/setup_env.sh`` runs it); without it the package uses its pure TensorFlow
paths.
"""

import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "keras_sapa", "version.py")) as f:
        namespace = {}
        exec(f.read(), namespace)
        return namespace["__version__"]


setup(
    name="keras_sapa",
    version=_version(),
    description="SAPA content-aware feature upsampling for Keras 3 and TensorFlow",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_sapa", "keras_sapa.*"]),
    package_data={"keras_sapa": ["_lib/*.so", "_lib/*.json"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "keras-cv>=0.9",
        "numpy",
    ],
    extras_require={
        "test": ["pytest", "hypothesis", "nbclient", "nbformat", "ipykernel"],
        "demo": ["scikit-image", "matplotlib", "tqdm"],
        "torch": ["torch"],
    },
    entry_points={"console_scripts": ["keras-sapa=keras_sapa.__main__:main"]},
)
