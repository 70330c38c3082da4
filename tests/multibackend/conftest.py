"""Backend-neutral tests: they run on whatever ``KERAS_BACKEND`` says. The main
``pytest tests`` run executes them on TensorFlow; ``tests/test_backends.py`` runs this
folder again in one subprocess per other backend (JAX, PyTorch).

On JAX, 64-bit floats are enabled for this process: the gradient checks compare
against float64 finite differences, which need float64 arrays.
"""

import keras

if keras.config.backend() == "jax":
    import jax

    jax.config.update("jax_enable_x64", True)
