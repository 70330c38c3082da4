"""The segmentation comparison of ``python -m keras_sapa demo --train``.

KerasCV's ``DeepLabV3Plus`` (one 8x bilinear decoder upsampling) against
:class:`keras_sapa.models.SAPADeepLabV3Plus` (three SAPA-G 2x stages), built from the
same seed on the same tiny backbone, trained with ``model.fit`` on identical batches of
the synthetic shapes task (:mod:`keras_sapa.data`) and evaluated on held-out images
(mIoU and boundary F-score). KerasCV needs the TensorFlow backend.
"""

import time
import warnings

import keras
import numpy as np

from keras_sapa import data

#: The names of the two models, in training order.
STOCK, SAPA = "bilinear (stock)", "SAPA"


def require_tensorflow():
    """Raises ``RuntimeError`` unless Keras runs on TensorFlow (KerasCV needs it)."""
    if keras.config.backend() != "tensorflow":
        raise RuntimeError(
            "The segmentation comparison uses KerasCV models, which need the TensorFlow "
            f"backend: set KERAS_BACKEND=tensorflow. Received: backend={keras.config.backend()!r}"
        )


def _backbone(image_size):
    import keras_cv

    # Two bottleneck blocks per stack (KerasCV's ResNetV2 fails with one): P2..P5 have
    # 32, 64, 128 and 256 channels at strides 4, 8, 16 and 32.
    return keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 16, 32, 64],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=True,
        input_shape=(image_size, image_size, 3),
    )


def build_segmentation_models(image_size=64, num_classes=None, seed=0, variant="gated"):
    """The two models of the comparison, built from the same seed.

    Returns:
        ``{"bilinear (stock)": keras_cv DeepLabV3Plus, "SAPA": SAPADeepLabV3Plus}``,
        each with a freshly built small ResNetV2 backbone (identical initial weights)
        and a 64-channel spatial pyramid pooling (dilations 1, 2, 3: at 64 x 64 the P5
        map is 2 x 2, so DeepLab's 6, 12, 18 would only see padding).
    """
    require_tensorflow()
    import keras_cv

    from keras_sapa.models import SAPADeepLabV3Plus

    num_classes = num_classes or data.NUM_CLASSES

    def spp():
        return keras_cv.layers.SpatialPyramidPooling(dilation_rates=[1, 2, 3], num_channels=64)

    keras.utils.set_random_seed(seed)
    stock = keras_cv.models.DeepLabV3Plus(
        _backbone(image_size), num_classes, spatial_pyramid_pooling=spp()
    )
    keras.utils.set_random_seed(seed)
    sapa = SAPADeepLabV3Plus(
        _backbone(image_size), num_classes, variant=variant, spatial_pyramid_pooling=spp()
    )
    return {STOCK: stock, SAPA: sapa}


def train_batch(step, batch_size, image_size, seed):
    """The training batch of ``step``: ``(images, masks)``, the same for every model."""
    return data.make_shapes(batch_size, image_size, seed=[seed, 1, step])


class ShapesBatches(keras.utils.PyDataset):
    """``steps`` training batches of the shapes task, generated on demand: batch ``i``
    is :func:`train_batch` ``(i, batch_size, image_size, seed)`` (fit it with
    ``shuffle=False`` so that every model sees them in the same order)."""

    def __init__(self, steps, batch_size=16, image_size=64, seed=0, **kwargs):
        super().__init__(**kwargs)
        self.steps, self.batch_size, self.image_size, self.seed = steps, batch_size, image_size, seed

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        return train_batch(index, self.batch_size, self.image_size, self.seed)


def static_dataset(batches):
    """``batches`` (a :class:`ShapesBatches`) as a ``tf.data.Dataset`` whose elements
    have fully static shapes, batch size included.

    ``fit`` on a ``PyDataset`` makes a dataset whose batch dimension is unknown, and
    the SAPA model then took about twice as long inside ``fit`` (tracing for any batch
    size) as with ``train_on_batch``: 144-151 s against 74-88 s for 30 steps of 8 on a
    loaded 2-core machine (the stock model: no difference). With this dataset ``fit`` took 41.9 s
    against 57.5 s for ``train_on_batch`` (same 30 steps, one run each). Training runs
    on TensorFlow anyway (KerasCV), so the demo feeds ``fit`` this dataset.
    """
    import tensorflow as tf

    x, y = batches[0]
    signature = (tf.TensorSpec(x.shape, tf.float32), tf.TensorSpec(y.shape, tf.int32))
    dataset = tf.data.Dataset.from_generator(
        lambda: (batches[i] for i in range(len(batches))), output_signature=signature
    )
    return dataset.apply(tf.data.experimental.assert_cardinality(len(batches)))


class StepLog(keras.callbacks.Callback):
    """Records the training loss of every step and the time spent in ``fit``, and
    evaluates on ``(eval_x, eval_y)`` every ``every`` steps (when > 0; the time of
    those evaluations is not counted in :attr:`seconds`).

    After ``fit``: :attr:`log` is ``{"loss": [per step], "eval_step": [...],
    "miou": [...], "boundary_f": [...]}``.
    """

    def __init__(self, eval_x=None, eval_y=None, every=0, steps=None):
        super().__init__()
        self.eval_x, self.eval_y, self.every, self.steps = eval_x, eval_y, every, steps
        self.log = {"loss": [], "eval_step": [], "miou": [], "boundary_f": []}
        self.seconds = 0.0
        self._mean = 0.0
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        # Keras logs the running mean of the loss over the epoch (one epoch here):
        # step n's own loss is n * mean_n - (n - 1) * mean_(n-1).
        mean = float(logs["loss"])
        self.log["loss"].append((batch + 1) * mean - batch * self._mean)
        self._mean = mean
        step = batch + 1
        if self.every and (step % self.every == 0 or step == self.steps):
            self.seconds += time.perf_counter() - self._start
            pred = predict_masks(self.model, self.eval_x)
            self.log["eval_step"].append(step)
            self.log["miou"].append(data.mean_iou(self.eval_y, pred)[0])
            self.log["boundary_f"].append(data.boundary_f_score(self.eval_y, pred)[0])
            self._start = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds += time.perf_counter() - self._start


def predict_masks(model, images, batch_size=32):
    """The class of every pixel (``argmax`` of the model's output), int ``(N, H, W)``."""
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0)).argmax(-1)


def train_and_evaluate(
    steps=400,
    batch_size=16,
    image_size=64,
    seed=0,
    eval_images=64,
    learning_rate=3e-3,
    progress=True,
    history_every=0,
):
    """Train both models of :func:`build_segmentation_models` with ``model.fit`` for
    ``steps`` steps on identical batches (:class:`ShapesBatches`, fed through
    :func:`static_dataset`) and evaluate them on ``eval_images`` held-out images
    (another seed).

    Adam with a cosine decay of ``learning_rate`` to 0 (the last steps settle the
    weights and the batch-norm statistics, so the held-out numbers are not a snapshot of
    a noisy step). ``progress`` shows Keras's progress bar.

    Returns:
        A dict: ``results`` (name -> ``{"miou", "boundary_f", "params", "seconds"}``),
        ``history`` (name -> ``{"loss": [per step], "eval_step": [...], "miou": [...],
        "boundary_f": [...]}``, evaluated every ``history_every`` steps when > 0),
        ``models``, ``eval`` (images, masks) and ``predictions`` (name -> masks).
        ``seconds`` is the time inside ``fit`` (batch generation included, held-out
        evaluations excluded).
    """
    from keras_sapa.ops import _checks

    steps = _checks.positive_int("steps", steps)
    batch_size = _checks.positive_int("batch_size", batch_size)
    eval_images = _checks.positive_int("eval_images", eval_images)
    history_every = _checks.integer("history_every", history_every, "an integer >= 0", minimum=0)

    models = build_segmentation_models(image_size, seed=seed)
    eval_x, eval_y = data.make_shapes(eval_images, image_size, seed=[seed, 2])
    results, history, predictions = {}, {}, {}
    for name, model in models.items():
        keras.utils.set_random_seed(seed)
        model.compile(
            optimizer=keras.optimizers.Adam(
                keras.optimizers.schedules.CosineDecay(learning_rate, steps)
            ),
            loss="sparse_categorical_crossentropy",
        )
        if progress:
            print(f"{name}:")
        log = StepLog(eval_x, eval_y, history_every, steps)
        with warnings.catch_warnings():
            # KerasCV's ResNetV2 backbone has a final batch norm that DeepLab's
            # decoder never uses: Keras warns that it gets no gradient.
            warnings.filterwarnings("ignore", message=r"Gradients do not exist for variables \['post_bn")
            model.fit(
                static_dataset(ShapesBatches(steps, batch_size, image_size, seed)),
                epochs=1,
                shuffle=False,
                callbacks=[log],
                verbose=1 if progress else 0,
            )
        history[name] = log.log
        pred = predict_masks(model, eval_x)
        predictions[name] = pred
        results[name] = {
            "miou": data.mean_iou(eval_y, pred)[0],
            "boundary_f": data.boundary_f_score(eval_y, pred, tolerance=1)[0],
            "params": model.count_params(),
            "seconds": log.seconds,
        }
    return {
        "results": results,
        "history": history,
        "models": models,
        "eval": (eval_x, eval_y),
        "predictions": predictions,
    }


def format_training_table(results):
    """A plain-text table of ``results`` (:func:`train_and_evaluate`'s ``results``)."""
    width = max(len("model"), *(len(n) for n in results))
    header = f"{'model':<{width}}  {'mIoU':>6}  {'boundary F':>10}  {'params':>9}  {'train s':>8}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lines.append(
            f"{name:<{width}}  {r['miou']:>6.3f}  {r['boundary_f']:>10.3f}  "
            f"{r['params']:>9,}  {r['seconds']:>8.1f}"
        )
    return "\n".join(lines)
