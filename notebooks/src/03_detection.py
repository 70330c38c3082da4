# %% [markdown]
# # RetinaNet with the SAPA feature pyramid
#
# `keras_sapa.models.SAPAFeaturePyramid` is KerasCV's RetinaNet feature pyramid with SAPA
# (SAPA-B by default, the variant the paper reports for detection) in each top-down step
# instead of nearest upsampling; `SAPARetinaNet` is `keras_cv.models.RetinaNet` with that
# pyramid by default, and keeps it through `get_config`/`.keras` files (the stock
# RetinaNet drops a custom pyramid from its config).
#
# Here: a tiny RetinaNet on synthetic boxes, a few training steps. Far too little training
# to detect anything well; the point is the API.
#
# **Backend.** KerasCV needs TensorFlow, so this notebook sets `KERAS_BACKEND=tensorflow`
# before Keras is imported.

# %%
import os

os.environ["KERAS_BACKEND"] = "tensorflow"  # KerasCV models need TensorFlow
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quieter TensorFlow start-up
# Set by the test suite: smaller runs, same code.
QUICK = os.environ.get("KERAS_SAPA_NOTEBOOK_QUICK", "0") == "1"

import keras
import keras_cv
import matplotlib.pyplot as plt
import numpy as np

import keras_sapa
from keras_sapa.models import SAPAFeaturePyramid
from keras_sapa.models import SAPARetinaNet

print(
    "keras",
    keras.__version__,
    "| keras_cv",
    keras_cv.__version__,
    "| keras_sapa",
    keras_sapa.__version__,
)

# %%
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
            images[i, y0 : y0 + h, x0 : x0 + w] = 0.95 if cls == 0 else 0.05
            boxes[i, j] = (x0, y0, w, h)
            classes[i, j] = cls
    return images, {"boxes": boxes, "classes": classes}


x_train, y_train = synthetic_boxes(16, seed=0)
plt.imshow(x_train[0])
for (x0, y0, w, h), c in zip(y_train["boxes"][0], y_train["classes"][0], strict=False):
    if c >= 0:
        plt.gca().add_patch(plt.Rectangle((x0, y0), w, h, fill=False, ec="red"))
plt.title("a training image and its boxes (xywh)")
plt.show()

# %% [markdown]
# Build the model from constructors only (no download): a small ResNetV2 backbone, the
# SAPA pyramid with 64 channels, and lighter prediction heads.

# %%
keras.utils.set_random_seed(0)
backbone = keras_cv.models.ResNetV2Backbone(
    stackwise_filters=[8, 16, 32, 64],
    stackwise_blocks=[2, 2, 2, 2],
    stackwise_strides=[1, 2, 2, 2],
    include_rescaling=False,
    input_shape=(IMAGE, IMAGE, 3),
)
# The upsampler is one argument: SAPA-B (the default) with a narrower embedding here.
pyramid = SAPAFeaturePyramid(
    num_channels=64, upsampler={"variant": "bilinear", "embedding_dim": 16}
)
prior = -np.log((1 - 0.01) / 0.01)
model = SAPARetinaNet(
    backbone=backbone,
    num_classes=NUM_CLASSES,
    bounding_box_format="xywh",
    feature_pyramid=pyramid,
    classification_head=keras_cv.models.retinanet.PredictionHead(
        output_filters=9 * NUM_CLASSES,
        bias_initializer=keras.initializers.Constant(prior),
        num_conv_layers=1,
    ),
    box_head=keras_cv.models.retinanet.PredictionHead(
        output_filters=9 * 4,
        bias_initializer="zeros",
        num_conv_layers=1,
    ),
)
print("SAPA layers in the pyramid:", [layer.name for layer in model.feature_pyramid.upsamplers])
print("parameters:", model.count_params())

# %% [markdown]
# Train a few steps with KerasCV's focal and smooth-L1 losses. (The quick smoke run that
# CI makes of this notebook trains and predicts eagerly: for two steps, tracing the train
# step costs more than it saves.)

# %%
model.compile(
    classification_loss="focal",
    box_loss="smoothl1",
    optimizer=keras.optimizers.Adam(3e-4, global_clipnorm=1.0),
    jit_compile=False,
    run_eagerly=QUICK,
)
EPOCHS = 1 if QUICK else 15
history = model.fit(x_train, y_train, epochs=EPOCHS, batch_size=8, verbose=0)
losses = history.history["loss"]
print("loss per epoch:", [round(v, 3) for v in losses])
plt.plot(np.arange(1, len(losses) + 1), losses, "o-")
plt.xlabel("epoch")
plt.ylabel("loss")
plt.show()

# %% [markdown]
# Predictions are decoded by RetinaNet's non-max suppression into padded box tensors
# (after so little training they are mostly noise):

# %%
pred = model.predict(x_train[:2], verbose=0)
print({key: np.asarray(value).shape for key, value in pred.items()})
print("boxes kept for image 0:", int(pred["num_detections"][0]))

# %% [markdown]
# The SAPA pyramid survives a `.keras` round trip (the stock RetinaNet would come back
# with its default nearest-neighbour pyramid):

# %%
import tempfile

path = os.path.join(tempfile.mkdtemp(), "retinanet.keras")
model.save(path)
restored = keras.models.load_model(path)
print(type(restored).__name__, type(restored.feature_pyramid).__name__)
a = model(x_train[:2], training=False)
b = restored(x_train[:2], training=False)
print(
    "max |difference| of the raw outputs:",
    max(
        float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k]))))
        for k in ("box", "classification")
    ),
)
