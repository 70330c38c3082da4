# %% [markdown]
# # SAPA quickstart
#
# SAPA (Similarity-Aware Point Affiliation, Lu et al., NeurIPS 2022) upsamples a
# low-resolution feature `x` by an integer factor `s`, guided by a high-resolution feature
# `guide`. Every output point takes a softmax-weighted mix of the `K x K` points of `x`
# around it; the weights are the similarity between the guide point (the query) and each
# of those points (the keys). Inside a region all neighbours are alike, so the mix is a
# smooth interpolation; at a boundary only the points on the output point's own side are
# alike, so the edge stays sharp.
#
# This notebook: SAPA in a functional Keras model, its four variants, the functional ops,
# what the kernels look like on a real photograph, and SAPA-D's moving sample points.
#
# **Backend.** Keras 3 runs on JAX, PyTorch or TensorFlow, chosen by the `KERAS_BACKEND`
# environment variable before Keras is first imported: set it in the shell
# (`KERAS_BACKEND=jax jupyter lab`) or in the first cell below. SAPA and everything in
# this notebook run on all three; the KerasCV models of notebooks 02 and 03 need
# TensorFlow.

# %%
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # or "jax", "torch"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up
# Set by the test suite: smaller runs, same code.
QUICK = os.environ.get("KERAS_SAPA_NOTEBOOK_QUICK", "0") == "1"

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_sapa
from keras_sapa import demo
from keras_sapa import ops

print(
    "keras",
    keras.__version__,
    "| backend",
    keras.config.backend(),
    "| keras_sapa",
    keras_sapa.__version__,
)
print("compiled SAPA op available:", ops.compiled_available())

# %% [markdown]
# ## SAPA in a functional model
#
# Call the layer as `SAPA(...)(x, guide)`: `x` is `(B, H, W, Cx)` and `guide` must be
# exactly `(B, s*H, s*W, Cy)`. Here a tiny encoder gives a stride-2 guide and a stride-4
# feature; SAPA brings the stride-4 feature to stride 2, guided by the stride-2 one.

# %%
inputs = keras.Input((64, 64, 3))
guide = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="enc_s2")(
    inputs
)
low = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="enc_s4")(
    guide
)
up = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=16, variant="gated", name="sapa")(
    low, guide
)
outputs = keras.layers.Conv2D(2, 1, activation="softmax", name="classifier")(up)
model = keras.Model(inputs, outputs)
model.summary()

y = model(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32"))
print("output:", y.shape)

# %% [markdown]
# It trains like any layer. Wrong shapes are an error, never a silent crop or resize:

# %%
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x_train = np.random.default_rng(1).uniform(size=(8, 64, 64, 3)).astype("float32")
y_train = (x_train[:, ::2, ::2, 0] > 0.5).astype("int32")
history = model.fit(x_train, y_train, epochs=2, batch_size=4, verbose=0)
print("losses:", [round(v, 4) for v in history.history["loss"]])

try:
    keras_sapa.SAPA(up_factor=2)(
        np.zeros((1, 8, 8, 4), "float32"), np.zeros((1, 15, 16, 4), "float32")
    )
except ValueError as error:
    print("ValueError:", error)

# %% [markdown]
# ## The variants
#
# | variant | query | paper |
# |---|---|---|
# | `identity` | `norm(guide)` | SAPA-I, no projection; needs `Cx == Cy` |
# | `bilinear` | `Dense_q(norm(guide))` | SAPA-B |
# | `gated` | gated mix of `Dense_qy(norm(guide))` and `Dense_qx(up(x))` | SAPA-G, the best |
# | `concat` | `Dense_q([norm(guide), up(x)])` | ablation of the official code |
#
# The key is `norm(x)` for `identity` and `Dense_k(norm(x))` for the others. The value is
# `x` itself (or `Dense_v(norm(x))` when `output_dim` differs from `Cx`).

# %%
rng = np.random.default_rng(2)
x = rng.normal(size=(1, 8, 8, 32)).astype("float32")
g = rng.normal(size=(1, 16, 16, 32)).astype("float32")
for variant in ("identity", "bilinear", "gated", "concat"):
    layer = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=16, variant=variant)
    out = layer(x, g)
    names = sorted({w.path.split("/")[-2] for w in layer.weights})
    print(
        f"{variant:>8}: output {tuple(out.shape)}, {layer.count_params():5d} params, "
        f"sublayers {names}"
    )

# %% [markdown]
# ## The functional ops
#
# `keras_sapa.ops` exposes the two primitives of the official code, channels last:
# `similarity(query, key)` gives the `K*K` window logits of every output point,
# `aggregate(weights, value)` mixes the window, and `sapa` is
# `aggregate(softmax(similarity))`. Points outside the map enter the softmax with
# similarity 0 and contribute 0, as in the official kernels.

# %%
q = rng.normal(size=(1, 16, 16, 8)).astype("float32")
k = rng.normal(size=(1, 8, 8, 8)).astype("float32")
v = rng.normal(size=(1, 8, 8, 3)).astype("float32")
logits = ops.similarity(q, k, kernel_size=3, up_factor=2)
weights = keras.ops.softmax(logits, axis=-1)
manual = ops.aggregate(weights, v, kernel_size=3, up_factor=2)
fused = ops.sapa(q, k, v, kernel_size=3, up_factor=2)
print(
    "logits",
    tuple(logits.shape),
    "| max |sapa - aggregate(softmax(similarity))| =",
    float(keras.ops.max(keras.ops.abs(fused - manual))),
)
print("implementation used by 'auto' here:", ops.resolve_implementation("auto"))

# %% [markdown]
# ## Kernels on a real photograph
#
# Without training, the similarity needs an embedding in which "alike" means something.
# Raw RGB dot products do not: `<q, k>` favours bright keys whatever the query, so an
# untrained `identity` layer on RGB is just a blur. A fixed embedding of colour and
# position (what `python -m keras_sapa demo` uses, see `keras_sapa.demo.colour_embedding`)
# makes the dot product exactly a Gaussian of colour and position distance, so each
# output pixel mixes the low-resolution pixels that look like it.
#
# Below: a photo shrunk 4x by block means, then brought back with bilinear resizing, the
# untrained `identity` layer on raw RGB, and SAPA with the colour embedding, guided by the
# full-resolution photo (`demo.guided_upsampling` runs every method and measures it).
# SAPA sees the full-resolution photo and bilinear does not: this shows what the guide
# allows, not a fair super-resolution contest.

# %%
scale = 4
photo = demo.center_crop(demo.load_image("chelsea"), 192 if QUICK else 256)
result = demo.guided_upsampling(photo, scale=scale, kernel_size=5)
reference, low = result["reference"], result["low"]
naive = keras_sapa.SAPA(up_factor=scale, kernel_size=5, variant="identity", norm=None)(
    low[None], reference[None]
)
naive = np.clip(keras.ops.convert_to_numpy(naive)[0], 0, 1)

panels = {
    "original": reference,
    "low-res (nearest)": result["outputs"]["nearest"],
    "bilinear": result["outputs"]["bilinear"],
    "SAPA-I on raw RGB, untrained": naive,
    "SAPA, colour embedding": result["outputs"]["SAPA"],
}
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
for ax, (name, image) in zip(axes, panels.items(), strict=False):
    ax.imshow(image)
    title = name if name == "original" else f"{name}\nPSNR {demo.psnr(image, reference):.1f} dB"
    ax.set_title(title, fontsize=10)
    ax.axis("off")
plt.tight_layout()
plt.show()
print(demo.format_table(result["metrics"]))

# %% [markdown]
# How many low-resolution points does each output pixel mix? `exp(entropy)` of its
# kernel (`demo.kernel_spread`), from 1 (it copies one point) to `K*K = 25` (a plain
# average). Low at edges (affiliation to one side), higher in flat regions (smoothing).
# Temperature matters: `color_sigma` is the softmax temperature in colour units; larger
# values smooth more.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, sigma in zip(axes, (0.03, 0.1, 0.3), strict=False):
    _, w = demo.sapa_upsample(
        low, reference, scale, kernel_size=5, color_sigma=sigma, return_weights=True
    )
    shown = ax.imshow(demo.kernel_spread(w), vmin=1, vmax=25, cmap="viridis")
    ax.set_title(f"points mixed, color_sigma={sigma}")
    ax.axis("off")
fig.colorbar(shown, ax=axes, fraction=0.02)
plt.show()

# %% [markdown]
# The kernels of four points on a line across an edge (`demo.boundary_points`): each is
# the `5 x 5` window of low-resolution pixels, circle area = weight
# (`demo.draw_kernels`). Points on either side of the edge draw from different pixels.

# %%
(ey, ex), points = demo.boundary_points(result, crop=96)
fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
y0, x0 = max(ey - 12, 0), max(ex - 12, 0)
axes[0].imshow(reference[y0 : ey + 12, x0 : ex + 12])
for label, (py, px) in zip("ABCD", points, strict=False):
    axes[0].plot(px - x0, py - y0, "o", mfc="none", mec="yellow")
    axes[0].text(px - x0 + 1, py - y0 - 1, label, color="yellow")
axes[0].set_title("guide near an edge")
axes[0].axis("off")
demo.draw_kernels(axes[1:], result, points)
plt.show()

# %% [markdown]
# ## SAPA-D: points that move
#
# `keras_sapa.SAPADeform` (SAPA-D, the extended paper's dynamic point selection) drops the
# fixed `K x K` window: each output pixel samples `P` points (bilinearly) wherever its
# offset branch, a 1x1 convolution of `x`, puts them, and weights them by similarity.
# Here the similarity is the same colour Gaussian and only the offsets are learned: they
# start as a 3 x 3 square around each output pixel and are trained for a few steps on
# *another* photograph (`coffee`), then SAPA-D upsamples this one
# (`guided_upsampling(deform_steps=...)`, or `python -m keras_sapa demo --deform`). The
# figure draws, for the four points across the edge, the initial square (dots) and where
# the trained offsets moved the points (crosses), read from
# `SAPADeform.sampling_offsets(x)`.

# %%
result_d = demo.guided_upsampling(
    photo,
    scale=scale,
    kernel_size=5,
    deform_steps=3 if QUICK else 150,
    deform_image=demo.load_image("coffee"),
)
print(demo.format_table(result_d["metrics"]))
demo.deform_figure(result_d, crop=96)
plt.show()
layer = result_d["deform"]["layer"]
print(layer.num_points, "points per output pixel; where pixel A samples (low-res row, column):")
print(demo.sampling_positions(layer, low, points[:1])[0].round(2))

# %% [markdown]
# The same on any photo, as a table and a figure: `python -m keras_sapa demo --image
# PATH`. Next: `02_segmentation.ipynb` trains SAPA inside DeepLabV3+, where the
# embedding is learned instead of fixed.
