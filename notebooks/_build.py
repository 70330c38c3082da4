"""Writes the tutorial notebooks from the cell sources below (no outputs).

    python notebooks/_build.py          # rewrite notebooks/*.ipynb
    python notebooks/_build.py --check  # exit 1 if a notebook differs from this file

The notebooks are generated so that they stay reviewable as plain Python and are
committed without outputs; tests/test_notebooks.py executes them. Every notebook reads
``KERAS_SAPA_NOTEBOOK_QUICK=1`` (set by the tests) to shrink its training runs.
"""

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell
from nbformat.v4 import new_markdown_cell
from nbformat.v4 import new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Set by the test suite: smaller runs, same code.
QUICK = os.environ.get("KERAS_SAPA_NOTEBOOK_QUICK", "0") == "1"

import numpy as np
import matplotlib.pyplot as plt
import keras
import tensorflow as tf

import keras_sapa
from keras_sapa import ops

print("keras", keras.__version__, "| tensorflow", tf.__version__, "| keras_sapa", keras_sapa.__version__)
print("compiled SAPA op available:", ops.compiled_available())"""


def quickstart():
    return [
        new_markdown_cell("""\
# SAPA quickstart

SAPA (Similarity-Aware Point Affiliation, Lu et al., NeurIPS 2022) upsamples a
low-resolution feature `x` by an integer factor `s`, guided by a high-resolution feature
`guide`. Every output point takes a softmax-weighted mix of the `K x K` points of `x`
around it; the weights are the similarity between the guide point (the query) and each
of those points (the keys). Inside a region all neighbours are alike, so the mix is a
smooth interpolation; at a boundary only the points on the output point's own side are
alike, so the edge stays sharp.

This notebook: SAPA in a functional Keras model, its four variants, the functional ops,
and what the kernels look like on a real photograph."""),
        new_code_cell(SETUP),
        new_markdown_cell("""\
## SAPA in a functional model

Call the layer as `SAPA(...)(x, guide)`: `x` is `(B, H, W, Cx)` and `guide` must be
exactly `(B, s*H, s*W, Cy)`. Here a tiny encoder gives a stride-2 guide and a stride-4
feature; SAPA brings the stride-4 feature to stride 2, guided by the stride-2 one."""),
        new_code_cell("""\
inputs = keras.Input((64, 64, 3))
guide = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="enc_s2")(inputs)
low = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu", name="enc_s4")(guide)
up = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=16, variant="gated", name="sapa")(low, guide)
outputs = keras.layers.Conv2D(2, 1, activation="softmax", name="classifier")(up)
model = keras.Model(inputs, outputs)
model.summary()

y = model(np.random.default_rng(0).uniform(size=(2, 64, 64, 3)).astype("float32"))
print("output:", y.shape)"""),
        new_markdown_cell("""\
It trains like any layer. Wrong shapes are an error, never a silent crop or resize:"""),
        new_code_cell("""\
model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
x_train = np.random.default_rng(1).uniform(size=(8, 64, 64, 3)).astype("float32")
y_train = (x_train[:, ::2, ::2, 0] > 0.5).astype("int32")
history = model.fit(x_train, y_train, epochs=2, batch_size=4, verbose=0)
print("losses:", [round(v, 4) for v in history.history["loss"]])

try:
    keras_sapa.SAPA(up_factor=2)(np.zeros((1, 8, 8, 4), "float32"), np.zeros((1, 15, 16, 4), "float32"))
except ValueError as error:
    print("ValueError:", error)"""),
        new_markdown_cell("""\
## The variants

| variant | query | key | paper |
|---|---|---|---|
| `identity` | `norm(guide)` | `norm(x)` | SAPA-I, no projection; needs `Cx == Cy` |
| `bilinear` | `Dense_q(norm(guide))` | `Dense_k(norm(x))` | SAPA-B |
| `gated` | gate-weighted mix of `Dense_qy(norm(guide))` and `Dense_qx(up(x))` | `Dense_k(norm(x))` | SAPA-G, the paper's best |
| `concat` | `Dense_q([norm(guide), up(x)])` | `Dense_k(norm(x))` | ablation of the official code |

The value is `x` itself (or `Dense_v(norm(x))` when `output_dim` differs from `Cx`)."""),
        new_code_cell("""\
rng = np.random.default_rng(2)
x = rng.normal(size=(1, 8, 8, 32)).astype("float32")
g = rng.normal(size=(1, 16, 16, 32)).astype("float32")
for variant in ("identity", "bilinear", "gated", "concat"):
    layer = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=16, variant=variant)
    out = layer(x, g)
    names = sorted({w.path.split("/")[-2] for w in layer.weights})
    print(f"{variant:>8}: output {tuple(out.shape)}, {layer.count_params():5d} params, sublayers {names}")"""),
        new_markdown_cell("""\
## The functional ops

`keras_sapa.ops` exposes the two primitives of the official code, channels last:
`similarity(query, key)` gives the `K*K` window logits of every output point,
`aggregate(weights, value)` mixes the window, and `sapa` is
`aggregate(softmax(similarity))`. Points outside the map enter the softmax with
similarity 0 and contribute 0, as in the official kernels."""),
        new_code_cell("""\
q = rng.normal(size=(1, 16, 16, 8)).astype("float32")
k = rng.normal(size=(1, 8, 8, 8)).astype("float32")
v = rng.normal(size=(1, 8, 8, 3)).astype("float32")
logits = ops.similarity(q, k, kernel_size=3, up_factor=2)
weights = tf.nn.softmax(logits, axis=-1)
manual = ops.aggregate(weights, v, kernel_size=3, up_factor=2)
fused = ops.sapa(q, k, v, kernel_size=3, up_factor=2)
print("logits", logits.shape, "| max |sapa - aggregate(softmax(similarity))| =",
      float(tf.reduce_max(tf.abs(fused - manual))))
print("implementation used by 'auto' here:", ops.resolve_implementation("auto"))"""),
        new_markdown_cell("""\
## Kernels on a real photograph

Without training, the similarity needs an embedding in which "alike" means something.
Raw RGB dot products do not: `<q, k>` favours bright keys whatever the query, so an
untrained `identity` layer on RGB is just a blur. A fixed embedding of colour and
position (what `python -m keras_sapa demo` uses, see `keras_sapa.demo.colour_embedding`)
makes the dot product exactly a Gaussian of colour and position distance, so each
output pixel mixes the low-resolution pixels that look like it.

Below: a photo shrunk 4x by block means, then brought back with bilinear resizing, the
untrained `identity` layer on raw RGB, and SAPA with the colour embedding, guided by the
full-resolution photo. (SAPA sees the full-resolution photo, bilinear does not: this
shows what the guide allows, not a fair super-resolution contest.)"""),
        new_code_cell("""\
from keras_sapa import demo

scale = 4
photo = demo.center_crop(demo.load_image("chelsea"), 192 if QUICK else 256)
low, reference = demo.downsample(photo, scale)
bilinear = demo.upsample_resize(low, scale, "bilinear")
naive = keras_sapa.SAPA(up_factor=scale, kernel_size=5, variant="identity", norm=None)(
    low[None], reference[None]
).numpy()[0]
sapa, weights = demo.sapa_upsample(low, reference, scale, kernel_size=5, return_weights=True)

panels = {"original": reference, "low-res (nearest)": demo.upsample_nearest(low, scale),
          "bilinear": bilinear, "SAPA-I on raw RGB, untrained": np.clip(naive, 0, 1),
          "SAPA, colour embedding": sapa}
fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
for ax, (name, image) in zip(axes, panels.items()):
    ax.imshow(image)
    title = name if name == "original" else f"{name}\\nPSNR {demo.psnr(image, reference):.1f} dB"
    ax.set_title(title, fontsize=10)
    ax.axis("off")
plt.tight_layout()
plt.show()"""),
        new_markdown_cell("""\
How many low-resolution points does each output pixel mix? `exp(entropy)` of its
kernel, from 1 (it copies one point) to `K*K = 25` (a plain average). Low at edges
(affiliation to one side), higher in flat regions (smoothing). Temperature matters:
`color_sigma` is the softmax temperature in colour units; larger values smooth more."""),
        new_code_cell("""\
def spread(w):
    w = np.clip(w, 1e-12, 1.0)
    return np.exp(-(w * np.log(w)).sum(-1))

fig, axes = plt.subplots(1, 3, figsize=(13, 4))
for ax, sigma in zip(axes, (0.03, 0.1, 0.3)):
    _, w = demo.sapa_upsample(low, reference, scale, kernel_size=5, color_sigma=sigma, return_weights=True)
    shown = ax.imshow(spread(w), vmin=1, vmax=25, cmap="viridis")
    ax.set_title(f"points mixed, color_sigma={sigma}")
    ax.axis("off")
fig.colorbar(shown, ax=axes, fraction=0.02)
plt.show()"""),
        new_markdown_cell("""\
The kernels of four points on a line across an edge: each is the `5 x 5` window of
low-resolution pixels, circle area = weight. Points on either side of the edge draw
from different pixels."""),
        new_code_cell("""\
edges = demo.EdgeReference(reference)
top, left, size = demo._pick_crop(edges.edges, 96)
picked = demo._pick_boundary_points(edges.edges, reference, top, left, size, scale)
(ey, ex), points = picked
k = 5
padded = np.pad(low, ((2, 2), (2, 2), (0, 0)))
fig, axes = plt.subplots(1, 5, figsize=(16, 3.4))
zoom = reference[ey - 12:ey + 12, ex - 12:ex + 12]
axes[0].imshow(zoom)
for label, (py, px) in zip("ABCD", points):
    axes[0].plot(px - ex + 12, py - ey + 12, "o", mfc="none", mec="yellow")
    axes[0].text(px - ex + 13, py - ey + 11, label, color="yellow")
axes[0].set_title("guide near an edge")
yy, xx = np.mgrid[0:k, 0:k]
for ax, label, (py, px) in zip(axes[1:], "ABCD", points):
    ax.imshow(padded[py // scale:py // scale + k, px // scale:px // scale + k])
    ax.scatter(xx.ravel(), yy.ravel(), s=900 * weights[py, px], facecolors="none", edgecolors="white")
    ax.set_title(f"kernel at {label}")
for ax in axes:
    ax.axis("off")
plt.show()"""),
        new_markdown_cell("""\
Next: `02_segmentation.ipynb` trains SAPA inside DeepLabV3+, where the embedding is
learned instead of fixed."""),
    ]


def segmentation():
    return [
        new_markdown_cell("""\
# SAPA DeepLabV3+ against the stock model

KerasCV's `DeepLabV3Plus` upsamples its encoder output 8x with one fixed bilinear
`UpSampling2D`. `keras_sapa.models.SAPADeepLabV3Plus` replaces that step by three SAPA-G
2x stages guided by the backbone's P4, P3 and P2 features. Both are trained here from
the same seed, on the same batches, for the same steps, on the built-in synthetic task
of `keras_sapa.data`: shapes with exact boundaries whose class is their mean colour
family (red, green, blue; the background is grey), under textures and noise strong
enough that no single pixel tells its class, so a model has to average over a
neighbourhood, the averaging that blurs boundaries.

This is a small CPU experiment (a tiny ResNetV2 backbone, 64 x 64 images, minutes of
training): read the numbers as what they are, one seed of a toy task."""),
        new_code_cell(SETUP),
        new_code_cell("""\
from keras_sapa import data, demo

images, masks = data.make_shapes(6, 64, seed=0)
fig, axes = plt.subplots(2, 6, figsize=(13, 4.5))
for i in range(6):
    axes[0, i].imshow(images[i].astype("uint8"))
    axes[1, i].imshow(data.colorize(masks[i]), interpolation="nearest")
    axes[0, i].axis("off")
    axes[1, i].axis("off")
axes[1, 0].set_title("classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(data.CLASS_NAMES)), loc="left", fontsize=9)
plt.show()"""),
        new_markdown_cell("""\
## Train both

`demo.train_and_evaluate` builds both models (`demo.build_segmentation_models`: a
ResNetV2 backbone with stacks of 8, 16, 32, 64 bottleneck filters, a 64-channel spatial
pyramid pooling), trains each with Adam on identical batches and evaluates on held-out
images every few steps. The learning rate follows a cosine decay to zero. With
`KERAS_SAPA_NOTEBOOK_QUICK=1` (the test suite) it is 150 steps of 8 images, too few
for the comparison to mean much; the default, 400 steps of 16, takes about two and
a half minutes on two CPU cores."""),
        new_code_cell("""\
STEPS = 150 if QUICK else 400
EVERY = 50
run = demo.train_and_evaluate(steps=STEPS, batch_size=8 if QUICK else 16, seed=0,
                              eval_images=32 if QUICK else 64, history_every=EVERY)
print(demo.format_training_table(run["results"]))"""),
        new_markdown_cell("## Learning curves"),
        new_code_cell("""\
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name, log in run["history"].items():
    loss = np.array(log["loss"])
    smooth = np.convolve(loss, np.ones(5) / 5, mode="valid") if len(loss) >= 5 else loss
    axes[0].plot(np.arange(len(smooth)) + 1, smooth, label=name)
    axes[1].plot(log["eval_step"], log["miou"], "o-", label=name)
    axes[2].plot(log["eval_step"], log["boundary_f"], "o-", label=name)
for ax, title in zip(axes, ("training loss (5-step mean)", "held-out mIoU", "held-out boundary F (1 px)")):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
plt.show()"""),
        new_markdown_cell("""\
## Predictions at boundaries

Pixels on a true boundary (within 1 px) that each model gets wrong, in red."""),
        new_code_cell("""\
eval_x, eval_y = run["eval"]
names = list(run["predictions"])
near_boundary = data._dilate(data.boundaries(eval_y), 1)
fig, axes = plt.subplots(4, 2 + 2 * len(names), figsize=(2.2 * (2 + 2 * len(names)), 9))
for row in range(4):
    axes[row, 0].imshow(eval_x[row].astype("uint8"))
    axes[row, 1].imshow(data.colorize(eval_y[row]), interpolation="nearest")
    for j, name in enumerate(names):
        pred = run["predictions"][name][row]
        axes[row, 2 + 2 * j].imshow(data.colorize(pred), interpolation="nearest")
        wrong = (pred != eval_y[row]) & near_boundary[row]
        axes[row, 3 + 2 * j].imshow(np.where(wrong[..., None], [1.0, 0, 0], [0.9, 0.9, 0.9]))
for j, title in enumerate(["image", "truth"] + sum(([n, n + ": boundary errors"] for n in names), [])):
    axes[0, j].set_title(title, fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.show()

for name in names:
    pred = run["predictions"][name]
    acc = (pred == eval_y)[near_boundary].mean()
    print(f"{name:>16}: pixel accuracy within 1 px of a boundary {acc:.3f}, elsewhere {(pred == eval_y)[~near_boundary].mean():.3f}")"""),
        new_markdown_cell("""\
The same comparison from the command line, with a progress bar:
`python -m keras_sapa demo --train` (about four minutes on two CPU cores)."""),
    ]


def detection():
    return [
        new_markdown_cell("""\
# RetinaNet with the SAPA feature pyramid

`keras_sapa.models.SAPAFeaturePyramid` is KerasCV's RetinaNet feature pyramid with SAPA
(SAPA-B by default, the variant the paper reports for detection) in each top-down step
instead of nearest upsampling; `SAPARetinaNet` is `keras_cv.models.RetinaNet` with that
pyramid by default, and keeps it through `get_config`/`.keras` files (the stock
RetinaNet drops a custom pyramid from its config).

Here: a tiny RetinaNet on synthetic boxes, a few training steps. Far too little training
to detect anything well; the point is the API."""),
        new_code_cell(SETUP),
        new_code_cell("""\
import keras_cv
from keras_sapa.models import SAPAFeaturePyramid, SAPARetinaNet

IMAGE = 64
NUM_CLASSES = 2  # 0: bright box, 1: dark box


def synthetic_boxes(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.35, 0.65, size=(n, IMAGE, IMAGE, 3)).astype("float32")
    boxes = np.full((n, 2, 4), -1.0, "float32")
    classes = np.full((n, 2), -1.0, "float32")
    for i in range(n):
        for j in range(rng.integers(1, 3)):
            w, h = rng.integers(12, 32, size=2)
            x0, y0 = rng.integers(0, IMAGE - w), rng.integers(0, IMAGE - h)
            cls = rng.integers(NUM_CLASSES)
            images[i, y0:y0 + h, x0:x0 + w] = 0.95 if cls == 0 else 0.05
            boxes[i, j] = (x0, y0, w, h)
            classes[i, j] = cls
    return images, {"boxes": boxes, "classes": classes}


x_train, y_train = synthetic_boxes(16, seed=0)
plt.imshow(x_train[0])
for (x0, y0, w, h), c in zip(y_train["boxes"][0], y_train["classes"][0]):
    if c >= 0:
        plt.gca().add_patch(plt.Rectangle((x0, y0), w, h, fill=False, ec="red"))
plt.title("a training image and its boxes (xywh)")
plt.show()"""),
        new_markdown_cell("""\
Build the model from constructors only (no download): a small ResNetV2 backbone, the
SAPA pyramid with 64 channels, and lighter prediction heads."""),
        new_code_cell("""\
keras.utils.set_random_seed(0)
backbone = keras_cv.models.ResNetV2Backbone(
    stackwise_filters=[8, 16, 32, 64], stackwise_blocks=[2, 2, 2, 2],
    stackwise_strides=[1, 2, 2, 2], include_rescaling=False, input_shape=(IMAGE, IMAGE, 3),
)
pyramid = SAPAFeaturePyramid(num_channels=64, variant="bilinear", kernel_size=5, embedding_dim=16)
prior = -np.log((1 - 0.01) / 0.01)
model = SAPARetinaNet(
    backbone=backbone,
    num_classes=NUM_CLASSES,
    bounding_box_format="xywh",
    feature_pyramid=pyramid,
    classification_head=keras_cv.models.retinanet.PredictionHead(
        output_filters=9 * NUM_CLASSES, bias_initializer=keras.initializers.Constant(prior),
        num_conv_layers=1,
    ),
    box_head=keras_cv.models.retinanet.PredictionHead(
        output_filters=9 * 4, bias_initializer="zeros", num_conv_layers=1,
    ),
)
print("SAPA layers in the pyramid:", [layer.name for layer in model.feature_pyramid.upsamplers])
print("parameters:", model.count_params())"""),
        new_markdown_cell("Train a few steps with KerasCV's focal and smooth-L1 losses:"),
        new_code_cell("""\
model.compile(
    classification_loss="focal",
    box_loss="smoothl1",
    optimizer=keras.optimizers.Adam(3e-4, global_clipnorm=1.0),
    jit_compile=False,
)
EPOCHS = 3 if QUICK else 15
history = model.fit(x_train, y_train, epochs=EPOCHS, batch_size=8, verbose=0)
losses = history.history["loss"]
print("loss per epoch:", [round(v, 3) for v in losses])
plt.plot(np.arange(1, len(losses) + 1), losses, "o-")
plt.xlabel("epoch")
plt.ylabel("loss")
plt.show()"""),
        new_markdown_cell("""\
Predictions are decoded by RetinaNet's non-max suppression into padded box tensors
(after so little training they are mostly noise):"""),
        new_code_cell("""\
pred = model.predict(x_train[:2], verbose=0)
print({key: np.asarray(value).shape for key, value in pred.items()})
print("boxes kept for image 0:", int(pred["num_detections"][0]))"""),
        new_markdown_cell("""\
The SAPA pyramid survives a `.keras` round trip (the stock RetinaNet would come back
with its default nearest-neighbour pyramid):"""),
        new_code_cell("""\
import tempfile

path = os.path.join(tempfile.mkdtemp(), "retinanet.keras")
model.save(path)
restored = keras.models.load_model(path)
print(type(restored).__name__, type(restored.feature_pyramid).__name__)
a = model(x_train[:2], training=False)
b = restored(x_train[:2], training=False)
print("max |difference| of the raw outputs:",
      max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in ("box", "classification")))"""),
    ]


def export():
    return [
        new_markdown_cell("""\
# Saving and exporting SAPA models

- `.keras` files: the layer and models are registered serializables, so
  `keras.models.load_model` needs no `custom_objects` (only `import keras_sapa`).
- SavedModel with a serving signature (`model.export`), for TF Serving or any
  TensorFlow runtime, reloaded here in a fresh Python process that never imports
  `keras_sapa`.
- The compiled-op caveat: when the compiled SAPA op is built, `implementation="auto"`
  uses it for training and inference, but not while a SavedModel is traced: exports
  hold builtin ops only. A SavedModel made with the compiled op on purpose contains
  `KerasSapa>...` custom ops that only load where the library is loaded."""),
        new_code_cell(SETUP),
        new_code_cell("""\
import subprocess
import sys
import tempfile

workdir = tempfile.mkdtemp()
keras.utils.set_random_seed(0)
inputs = keras.Input((32, 32, 3), name="image")
guide = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(inputs)
low = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(guide)
up = keras_sapa.SAPA(up_factor=2, kernel_size=5, embedding_dim=8, variant="bilinear")(low, guide)
outputs = keras.layers.Conv2D(3, 1, name="head")(up)
model = keras.Model(inputs, outputs)
images = np.random.default_rng(0).uniform(size=(2, 32, 32, 3)).astype("float32")
expected = model(images).numpy()
print("output", expected.shape)"""),
        new_markdown_cell("## `.keras`"),
        new_code_cell("""\
keras_path = os.path.join(workdir, "model.keras")
model.save(keras_path)
reloaded = keras.models.load_model(keras_path)
print("max |difference|:", float(np.max(np.abs(reloaded(images).numpy() - expected))))"""),
        new_markdown_cell("""\
## SavedModel, portable

`model.export` writes a SavedModel with a `serve` endpoint (and the `serving_default`
signature). While a SavedModel is traced, every SAPA layer with
`implementation="auto"` uses its pure TensorFlow formulation, so the SavedModel needs
nothing but TensorFlow, whether or not the compiled op is built here."""),
        new_code_cell("""\
portable = os.path.join(workdir, "portable_savedmodel")
model.export(portable, verbose=False)
np.save(os.path.join(workdir, "images.npy"), images)
np.save(os.path.join(workdir, "expected.npy"), expected)

# A fresh process that imports TensorFlow only: no keras_sapa, no custom-op library.
FRESH = '''
import sys, numpy as np, tensorflow as tf
workdir, name = sys.argv[1], sys.argv[2]
loaded = tf.saved_model.load(workdir + "/" + name)
fn = loaded.signatures["serving_default"]
images = np.load(workdir + "/images.npy")
out = list(fn(tf.constant(images)).values())[0].numpy()
print("signature inputs:", list(fn.structured_input_signature[1]))
print("max |difference| vs the Keras model:", float(np.max(np.abs(out - np.load(workdir + "/expected.npy")))))
'''
result = subprocess.run([sys.executable, "-c", FRESH, workdir, "portable_savedmodel"],
                        capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
print(result.stdout or result.stderr[-2000:])
assert result.returncode == 0"""),
        new_markdown_cell("""\
## SavedModel with the compiled op

To serve with the compiled op, export inside `use_implementation("compiled")` (or
build the layers with `implementation="compiled"`). The SavedModel then holds
`KerasSapa>...` nodes, and a process that has not loaded the library cannot load it:
load the library before `tf.saved_model.load` with
`keras_sapa.ops.load_compiled_library()` (which needs the TensorFlow version the
library was built for)."""),
        new_code_cell("""\
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
    print("custom ops in the SavedModel:", sorted(op for op in graph_ops if op.startswith("KerasSapa")))

    plain = subprocess.run([sys.executable, "-c", FRESH, workdir, compiled_dir],
                           capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    print("fresh process, library not loaded -> exit code", plain.returncode)
    print("  ", [line for line in plain.stderr.splitlines() if "KerasSapa" in line][-1:])

    LOAD_FIRST = "import keras_sapa.ops; assert keras_sapa.ops.load_compiled_library()\\n" + FRESH
    loaded_first = subprocess.run([sys.executable, "-c", LOAD_FIRST, workdir, compiled_dir],
                                  capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    print("fresh process, library loaded first -> exit code", loaded_first.returncode)
    print(loaded_first.stdout)
    assert plain.returncode != 0 and loaded_first.returncode == 0"""),
    ]


NOTEBOOKS = {
    "01_quickstart.ipynb": quickstart,
    "02_segmentation.ipynb": segmentation,
    "03_detection.ipynb": detection,
    "04_export.ipynb": export,
}


def build(name):
    nb = new_notebook(cells=NOTEBOOKS[name]())
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    # Stable cell ids, so rebuilding does not rewrite every line of the JSON.
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"{name.split('_')[0]}-{i:02d}"
    return nbformat.writes(nb) + "\n"


def main(argv):
    check = "--check" in argv
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, name)
        text = build(name)
        current = open(path).read() if os.path.exists(path) else None
        if current != text:
            stale.append(name)
            if not check:
                with open(path, "w") as f:
                    f.write(text)
    if check and stale:
        print("out of date (run python notebooks/_build.py):", ", ".join(stale))
        return 1
    if not check:
        print("wrote", ", ".join(NOTEBOOKS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
