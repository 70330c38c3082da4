# %% [markdown]
# # Saving and exporting SAPA models
#
# - `.keras` files: the layer and models are registered serializables, so
#   `keras.models.load_model` needs no `custom_objects` (only `import keras_sapa`).
# - SavedModel with a serving signature (`model.export`), for TF Serving or any
#   TensorFlow runtime, reloaded here in a fresh Python process that never imports
#   `keras_sapa`.
# - The compiled-op caveat: when the compiled SAPA op is built, `implementation="auto"`
#   uses it for training and inference, but not while a SavedModel is traced: exports
#   hold builtin ops only. A SavedModel made with the compiled op on purpose contains
#   `KerasSapa>...` custom ops that only load where the library is loaded.
#
# **Backend.** `.keras` files load on any backend; the SavedModel parts need TensorFlow,
# so this notebook sets `KERAS_BACKEND=tensorflow` before Keras is imported.

# %%
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # SavedModel export needs TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up

import subprocess
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

import keras_sapa
from keras_sapa import ops

print(
    "keras",
    keras.__version__,
    "| tensorflow",
    tf.__version__,
    "| keras_sapa",
    keras_sapa.__version__,
)
print("compiled SAPA op available:", ops.compiled_available())

# %%
workdir = tempfile.mkdtemp()
keras.utils.set_random_seed(0)
inputs = keras.Input((32, 32, 3), name="image")
guide = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
low = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(guide)
up = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=8, variant="bilinear")(low, guide)
outputs = keras.layers.Conv2D(3, 1, name="head")(up)
model = keras.Model(inputs, outputs)
images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
expected = keras.ops.convert_to_numpy(model(images))
print("output", expected.shape)

# %% [markdown]
# ## `.keras`

# %%
keras_path = os.path.join(workdir, "model.keras")
model.save(keras_path)
reloaded = keras.models.load_model(keras_path)
print(
    "max |difference|:",
    float(np.max(np.abs(keras.ops.convert_to_numpy(reloaded(images)) - expected))),
)

# %% [markdown]
# ## SavedModel, portable
#
# `model.export` writes a SavedModel with a `serve` endpoint (and the `serving_default`
# signature). While a SavedModel is traced, every SAPA layer with
# `implementation="auto"` uses a builtin-op formulation, so the SavedModel needs nothing
# but TensorFlow, whether or not the compiled op is built here.

# %%
portable = os.path.join(workdir, "portable_savedmodel")
model.export(portable, verbose=False)
np.save(os.path.join(workdir, "images.npy"), images)
np.save(os.path.join(workdir, "expected.npy"), expected)

# A fresh process that imports TensorFlow only: no keras_sapa, no custom-op library.
FRESH = """
import sys, numpy as np, tensorflow as tf
workdir, name = sys.argv[1], sys.argv[2]
loaded = tf.saved_model.load(workdir + "/" + name)
fn = loaded.signatures["serving_default"]
images = np.load(workdir + "/images.npy")
out = list(fn(tf.constant(images)).values())[0].numpy()
print("signature inputs:", list(fn.structured_input_signature[1]))
difference = float(np.max(np.abs(out - np.load(workdir + "/expected.npy"))))
print("max |difference| vs the Keras model:", difference)
"""


def run_fresh(script, savedmodel):
    """Runs ``script`` in a new Python process (quiet TensorFlow logs)."""
    return subprocess.run(
        [sys.executable, "-c", script, workdir, savedmodel],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )


result = run_fresh(FRESH, "portable_savedmodel")
print(result.stdout or result.stderr[-2000:])
assert result.returncode == 0

# %% [markdown]
# ## SavedModel with the compiled op
#
# To serve with the compiled op, export inside `use_implementation("compiled")` (or
# build the layers with `implementation="compiled"`). The SavedModel then holds
# `KerasSapa>...` nodes, and a process that has not loaded the library cannot load it:
# load the library before `tf.saved_model.load` with
# `keras_sapa.ops.load_compiled_library()` (which needs the TensorFlow version the
# library was built for).

# %%
if not ops.compiled_available():
    print("The compiled op is not built here: every export is already portable.")
else:
    compiled_dir = "compiled_savedmodel"
    with ops.use_implementation("compiled"):
        model.export(os.path.join(workdir, compiled_dir), verbose=False)
    graph_ops = set()
    loaded = tf.saved_model.load(os.path.join(workdir, compiled_dir))
    for function in loaded.signatures.values():
        graph_ops |= {op.type for op in function.graph.get_operations()}
        for f in function.graph.as_graph_def().library.function:
            graph_ops |= {node.op for node in f.node_def}
    print(
        "custom ops in the SavedModel:",
        sorted(op for op in graph_ops if op.startswith("KerasSapa")),
    )

    plain = run_fresh(FRESH, compiled_dir)
    print("fresh process, library not loaded -> exit code", plain.returncode)
    print("  ", [line for line in plain.stderr.splitlines() if "KerasSapa" in line][-1:])

    LOAD_FIRST = "import keras_sapa.ops; assert keras_sapa.ops.load_compiled_library()\n" + FRESH
    loaded_first = run_fresh(LOAD_FIRST, compiled_dir)
    print("fresh process, library loaded first -> exit code", loaded_first.returncode)
    print(loaded_first.stdout)
    assert plain.returncode != 0 and loaded_first.returncode == 0
