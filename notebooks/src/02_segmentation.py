# %% [markdown]
# # SAPA DeepLabV3+ against the stock model
#
# KerasCV's `DeepLabV3Plus` upsamples its encoder output 8x with one fixed bilinear
# `UpSampling2D`. `keras_sapa.models.SAPADeepLabV3Plus` replaces that step by three SAPA-G
# 2x stages guided by the backbone's P4, P3 and P2 features. Both are trained here from
# the same seed, on the same batches, for the same steps, on the built-in synthetic task
# of `keras_sapa.demo.data`: shapes with exact boundaries whose class is their mean colour
# family (red, green, blue; the background is grey), under textures and noise strong
# enough that no single pixel tells its class, so a model has to average over a
# neighbourhood, the averaging that blurs boundaries.
#
# This is a small CPU experiment (a tiny ResNetV2 backbone, 64 x 64 images, minutes of
# training): read the numbers as what they are, one seed of a toy task.
#
# **Backend.** KerasCV needs TensorFlow, so this notebook sets `KERAS_BACKEND=tensorflow`
# before Keras is imported (restart the kernel if Keras was already imported with
# another backend).

# %%
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # KerasCV models need TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up
# Set by the test suite: smaller runs, same code.
QUICK = os.environ.get("KERAS_SAPA_NOTEBOOK_QUICK", "0") == "1"

import keras
import matplotlib.pyplot as plt
import numpy as np

import keras_sapa
from keras_sapa import demo
from keras_sapa.demo import data

print(
    "keras",
    keras.__version__,
    "| backend",
    keras.config.backend(),
    "| keras_sapa",
    keras_sapa.__version__,
)

# %%
images, masks = data.make_shapes(6, 64, seed=0)
fig, axes = plt.subplots(2, 6, figsize=(13, 4.5))
for i in range(6):
    axes[0, i].imshow(images[i].astype("uint8"))
    axes[1, i].imshow(data.colorize(masks[i]), interpolation="nearest")
    axes[0, i].axis("off")
    axes[1, i].axis("off")
axes[1, 0].set_title(
    "classes: " + ", ".join(f"{i} {n}" for i, n in enumerate(data.CLASS_NAMES)),
    loc="left",
    fontsize=9,
)
plt.show()

# %% [markdown]
# ## Train both
#
# `demo.train_and_evaluate` builds both models (`demo.build_segmentation_models`: a
# ResNetV2 backbone with stacks of 8, 16, 32, 64 bottleneck filters, a 64-channel spatial
# pyramid pooling) and trains each with `model.fit` on identical batches
# (`demo.ShapesBatches`, a `keras.utils.PyDataset`, handed to `fit` with static shapes by
# `demo.static_dataset`), Adam with a cosine decay of the learning rate to zero. The
# `demo.StepLog` callback records every step's loss and
# evaluates on held-out images every few steps. With `KERAS_SAPA_NOTEBOOK_QUICK=1` (the
# test suite) it is 2 steps of 2 images, a smoke run; the default, 400 steps of 16,
# takes a few minutes on two CPU cores.

# %%
STEPS = 2 if QUICK else 400
EVERY = 1 if QUICK else 50
run = demo.train_and_evaluate(
    steps=STEPS,
    batch_size=2 if QUICK else 16,
    seed=0,
    eval_images=4 if QUICK else 64,
    history_every=EVERY,
    progress=not QUICK,
)
print(demo.format_training_table(run["results"]))

# %% [markdown]
# ## Learning curves

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for name, log in run["history"].items():
    loss = np.array(log["loss"])
    smooth = np.convolve(loss, np.ones(5) / 5, mode="valid") if len(loss) >= 5 else loss
    axes[0].plot(np.arange(len(smooth)) + 1, smooth, label=name)
    axes[1].plot(log["eval_step"], log["miou"], "o-", label=name)
    axes[2].plot(log["eval_step"], log["boundary_f"], "o-", label=name)
for ax, title in zip(
    axes,
    ("training loss (5-step mean)", "held-out mIoU", "held-out boundary F (1 px)"),
    strict=False,
):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.legend()
plt.show()

# %% [markdown]
# ## Predictions at boundaries
#
# Pixels on a true boundary (within 1 px, `data.boundary_band`) that each model gets
# wrong, in red.

# %%
eval_x, eval_y = run["eval"]
names = list(run["predictions"])
near_boundary = data.boundary_band(eval_y, 1)
fig, axes = plt.subplots(4, 2 + 2 * len(names), figsize=(2.2 * (2 + 2 * len(names)), 9))
for row in range(4):
    axes[row, 0].imshow(eval_x[row].astype("uint8"))
    axes[row, 1].imshow(data.colorize(eval_y[row]), interpolation="nearest")
    for j, name in enumerate(names):
        pred = run["predictions"][name][row]
        axes[row, 2 + 2 * j].imshow(data.colorize(pred), interpolation="nearest")
        wrong = (pred != eval_y[row]) & near_boundary[row]
        axes[row, 3 + 2 * j].imshow(np.where(wrong[..., None], [1.0, 0, 0], [0.9, 0.9, 0.9]))
for j, title in enumerate(
    ["image", "truth"] + sum(([n, n + ": boundary errors"] for n in names), [])
):
    axes[0, j].set_title(title, fontsize=8)
for ax in axes.flat:
    ax.axis("off")
plt.show()

for name in names:
    correct = run["predictions"][name] == eval_y
    print(
        f"{name:>16}: pixel accuracy within 1 px of a boundary "
        f"{correct[near_boundary].mean():.3f}, "
        f"elsewhere {correct[~near_boundary].mean():.3f}"
    )

# %% [markdown]
# The same comparison from the command line, with Keras's progress bar:
# `python -m keras_sapa demo --train` (a few minutes on two CPU cores).
#
# ## SegFormer: SAPA in the all-MLP decoder, as in the paper
#
# The paper's segmentation results put SAPA into SegFormer. KerasHub's
# `SegFormerImageSegmenter` projects each of its MiT encoder's four stages to one width
# and resizes the three coarser ones bilinearly to the finest stage before fusing them;
# `keras_sapa.models.SAPASegFormer` climbs each coarser stage 2x at a time with SAPA
# (SAPA-B, K=5, d=32, the paper's setting), each step guided by the stage it arrives
# at. `train.build_segformer_models` builds both on the same tiny MiT encoder (stages of
# 16, 32, 64, 128 channels, one transformer block each, a 64-wide decoder) from the same
# seed, and `train.train_seeds` trains them on the same batches for several seeds, images
# scaled to [0, 1]. KerasHub runs on every backend: from the command line,
# `KERAS_BACKEND=jax python -m keras_sapa demo --train --model segformer --seeds 0,1,2`
# runs this on JAX (no tf.data there: `fit` reads the `PyDataset` of batches itself).
# With `KERAS_SAPA_NOTEBOOK_QUICK=1` it is one seed of 1 step, a smoke run.

# %%
from keras_sapa.demo import train as segtrain

SEEDS = [0] if QUICK else [0, 1, 2]
segformer = segtrain.train_seeds(
    SEEDS,
    model="segformer",
    steps=1 if QUICK else 200,
    batch_size=2 if QUICK else 8,
    eval_images=4 if QUICK else 64,
    progress=False,
)
print(segtrain.format_seed_table(segformer["per_seed"]))

# %% [markdown]
# Each row is one seed: both models start from the same encoder weights and see the same
# batches, so the difference column is the effect of the upsampler alone for that seed;
# the spread over seeds says how much of it is noise. A tiny model on a toy task: read
# it as a demonstration of the comparison, not as the paper's ADE20K result.

# %%
fig = demo.training_figure(segformer["last"], count=3)
plt.show()
