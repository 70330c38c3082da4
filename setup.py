"""keras_sapa: SAPA (Similarity-Aware Point Affiliation) feature upsampling for Keras 3.

The compiled kernels are optional and built separately by ``custom_ops/build.py``
(``scripts/setup_env.sh`` runs it); without them the package uses its pure paths.
"""

import os

from setuptools import find_packages
from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(HERE, "keras_sapa", "version.py")) as f:
        namespace = {}
        exec(f.read(), namespace)
        return namespace["__version__"]


def _readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        return f.read()


setup(
    name="keras_sapa",
    version=_version(),
    description="SAPA content-aware feature upsampling for Keras 3 (TensorFlow, JAX, PyTorch)",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["keras_sapa", "keras_sapa.*"]),
    # Native files stay out of distributions: the compiled libraries in keras_sapa/_lib
    # are tied to one TensorFlow version and one CPU architecture, so a wheel that
    # carried them could not honestly be tagged py3-none-any. They are built in place by
    # `python custom_ops/build.py` (scripts/setup_env.sh runs it); without them the
    # package runs on its pure paths. tests/test_packaging.py checks the wheel.
    exclude_package_data={"keras_sapa": ["_lib/*"]},
    # The layer needs only Keras and NumPy; each backend and integration is an extra.
    # Minimums are what the code calls (docs/installation.md lists the versions the test
    # suite ran with); keep the two in agreement.
    install_requires=[
        "keras>=3.5",
        "numpy",
    ],
    extras_require={
        # 2.16: the first TensorFlow whose Keras is Keras 3.
        "tensorflow": ["tensorflow>=2.16"],
        # 0.5: the public jax.ffi module (ffi_call, register_ffi_target, include_dir)
        # that the compiled-kernel bindings use.
        "jax": ["jax>=0.5"],
        # 2.4: torch.library.custom_op / register_fake / register_autograd; 2.6:
        # torch.compiler.is_exporting, which keeps the compiled kernels out of exports.
        "torch": ["torch>=2.6"],
        # KerasCV 0.9 is TensorFlow-only in practice (its models import tf).
        "keras-cv": ["keras-cv>=0.9", "tensorflow>=2.16"],
        "keras-hub": ["keras-hub>=0.20"],
        # Export checks: onnxruntime runs the ONNX export (tf2onnx writes it on the
        # TensorFlow backend), ai-edge-litert is the LiteRT interpreter; Keras 3.13 is
        # the first with model.export(format="litert").
        "export": ["keras>=3.13", "onnx", "onnxruntime", "tf2onnx", "ai-edge-litert"],
        # NVRTC and the CUDA headers from the same wheels tensorflow[and-cuda] installs:
        # the CUDA kernel images are compiled with them, no CUDA toolkit needed.
        "cuda-build": ["nvidia-cuda-nvrtc-cu12", "nvidia-cuda-runtime-cu12"],
        # ruff is the linter and formatter CI runs (pyproject.toml); one minor series,
        # because a new minor may change the formatting `ruff format --check` expects.
        # pytest-xdist: the suite runs in one worker per core (pytest.ini), about half
        # its time on the two-core CI machine.
        "test": [
            "pytest",
            "pytest-xdist",
            "hypothesis",
            "nbclient",
            "nbformat",
            "ipykernel",
            "jupytext",
            "ruff>=0.17,<0.18",
        ],
        "demo": ["scikit-image", "matplotlib", "tqdm"],
    },
    entry_points={"console_scripts": ["keras-sapa=keras_sapa.__main__:main"]},
)
