"""The segmentation comparisons of ``python -m keras_sapa demo --train``.

Two pairs of models (``model=``), each pair built from the same seed on the same tiny
backbone, trained with ``model.fit`` on identical batches of the synthetic shapes task
(:mod:`keras_sapa.demo.data`) and evaluated on held-out images (mIoU and boundary F-score):

- ``"deeplab"``: KerasCV's ``DeepLabV3Plus`` (one 8x bilinear decoder upsampling)
  against :class:`keras_sapa.models.SAPADeepLabV3Plus` (three SAPA-G 2x stages).
  KerasCV needs the TensorFlow backend.
- ``"segformer"``: KerasHub's ``SegFormerImageSegmenter`` (bilinear resizing in its
  all-MLP decoder) against :class:`keras_sapa.models.SAPASegFormer` (SAPA-B, K=5, d=32
  by default), on a tiny ``MiTBackbone``. Any Keras backend with KerasHub
  (TensorFlow and JAX are tested).

:func:`train_seeds` repeats a comparison over several seeds and
:func:`format_seed_table` summarises it.
"""

import time
import warnings

import keras
import numpy as np

from keras_sapa.demo import data

#: The names of the two models, in training order.
STOCK, SAPA = "bilinear (stock)", "SAPA"

#: The model pairs of :func:`train_and_evaluate` (``model=``).
MODELS = ("deeplab", "segformer")

#: The SAPA variant of each pair when none is given: SAPA-G for DeepLabV3Plus, SAPA-B
#: (the paper's SegFormer configuration) for SegFormer.
DEFAULT_VARIANTS = {"deeplab": "gated", "segformer": "bilinear"}
#: Runs of at most this many steps train and predict eagerly on TensorFlow: tracing the
#: train and predict steps of a pair costs about 35 s on two cores, an eager step of a
#: pair at batch 2 about 3 s against 1 s traced (DeepLab pair: 2 steps 37.4 s traced,
#: 14.4 s eager; SegFormer pair 38.1 and 17.2 s; same results). JAX stays jitted:
#: op-by-op dispatch is far slower there.
EAGER_STEPS = 4


def check_model(model):
    """Returns ``model`` if it names a pair of :data:`MODELS`; raises ``ValueError``."""
    if model not in MODELS:
        raise ValueError(f"`model` must be one of {MODELS}. Received: model={model!r}")
    return model


def require_tensorflow():
    """Raises ``RuntimeError`` unless Keras runs on TensorFlow (KerasCV needs it)."""
    if keras.config.backend() != "tensorflow":
        raise RuntimeError(
            "The segmentation comparison uses KerasCV models, which need the TensorFlow "
            f"backend: set KERAS_BACKEND=tensorflow. Received: backend={keras.config.backend()!r}"
        )


def tiny_resnet_backbone(image_size, include_rescaling=True):
    """The tiny KerasCV ``ResNetV2Backbone`` of the DeepLab pair: two bottleneck blocks
    per stack (KerasCV's ResNetV2 fails with one), P2..P5 with 32, 64, 128 and 256
    channels at strides 4, 8, 16 and 32; ``include_rescaling`` maps [0, 255] images
    to [0, 1]."""
    import keras_cv

    return keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 16, 32, 64],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        include_rescaling=include_rescaling,
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
        tiny_resnet_backbone(image_size), num_classes, spatial_pyramid_pooling=spp()
    )
    keras.utils.set_random_seed(seed)
    sapa = SAPADeepLabV3Plus(
        tiny_resnet_backbone(image_size),
        num_classes,
        upsampler={"variant": variant},
        spatial_pyramid_pooling=spp(),
    )
    return {STOCK: stock, SAPA: sapa}


def mit_encoder(
    image_size, hidden_dims=(16, 32, 64, 128), depth=1, num_heads=(1, 1, 2, 2), drop_path=0.0
):
    """A KerasHub ``MiTBackbone`` (SegFormer's encoder) with SegFormer's stage layout:
    one stage per entry of ``hidden_dims`` (up to four, at strides 4, 8, 16 and 32,
    spatial reduction 8, 4, 2, 1 and patch sizes 7, 3, 3, 3), ``depth`` transformer
    blocks each with ``num_heads`` heads. The defaults are the demo's tiny encoder;
    ``(64, 128, 320, 512)``, depth 2, heads ``(1, 2, 5, 8)`` and drop path 0.1 give
    SegFormer-B1's."""
    import keras_hub

    stages = len(hidden_dims)
    return keras_hub.models.MiTBackbone(
        image_shape=(image_size, image_size, 3),
        num_layers=stages,
        hidden_dims=list(hidden_dims),
        layerwise_depths=[depth] * stages,
        layerwise_num_heads=list(num_heads[:stages]),
        layerwise_sr_ratios=[8, 4, 2, 1][:stages],
        layerwise_patch_sizes=[7, 3, 3, 3][:stages],
        layerwise_strides=[4, 2, 2, 2][:stages],
        max_drop_path_rate=drop_path,
    )


def build_segformer_models(
    image_size=64,
    num_classes=None,
    seed=0,
    variant="bilinear",
    kernel_size=5,
    embedding_dim=32,
    projection_filters=64,
):
    """The SegFormer pair, built from the same seed (runs on any Keras backend).

    Returns:
        ``{"bilinear (stock)": keras_hub SegFormerImageSegmenter, "SAPA": SAPASegFormer}``,
        each on a freshly built tiny ``MiTBackbone`` (identical initial weights) with a
        ``projection_filters``-wide all-MLP decoder; the SAPA one upsamples with
        ``variant``, ``kernel_size`` and ``embedding_dim`` (SAPA-B, K=5, d=32 as in the
        paper's SegFormer runs). Both return logits, for images scaled to [0, 1].
    """
    import keras_hub

    from keras_sapa.models import SAPASegFormer

    num_classes = num_classes or data.NUM_CLASSES
    keras.utils.set_random_seed(seed)
    stock = keras_hub.models.SegFormerImageSegmenter(
        backbone=keras_hub.models.SegFormerBackbone(
            image_encoder=mit_encoder(image_size), projection_filters=projection_filters
        ),
        num_classes=num_classes,
    )
    keras.utils.set_random_seed(seed)
    sapa = SAPASegFormer(
        backbone=mit_encoder(image_size),
        num_classes=num_classes,
        projection_filters=projection_filters,
        upsampler={"variant": variant, "kernel_size": kernel_size, "embedding_dim": embedding_dim},
    )
    return {STOCK: stock, SAPA: sapa}


def train_batch(step, batch_size, image_size, seed):
    """The training batch of ``step``: ``(images, masks)``, the same for every model."""
    return data.make_shapes(batch_size, image_size, seed=[seed, 1, step])


class ShapesBatches(keras.utils.PyDataset):
    """``steps`` training batches of the shapes task, generated on demand: batch ``i``
    is :func:`train_batch` ``(i, batch_size, image_size, seed)`` (fit it with
    ``shuffle=False`` so that every model sees them in the same order), its images
    multiplied by ``image_scale`` (1/255 for models without their own rescaling)."""

    def __init__(self, steps, batch_size=16, image_size=64, seed=0, image_scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.steps, self.batch_size, self.image_size, self.seed = (
            steps,
            batch_size,
            image_size,
            seed,
        )
        self.image_scale = image_scale

    def __len__(self):
        return self.steps

    def __getitem__(self, index):
        x, y = train_batch(index, self.batch_size, self.image_size, self.seed)
        if self.image_scale != 1.0:
            x = (x * self.image_scale).astype(np.float32)
        return x, y


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


def _keras_method(model, name):
    """``model``'s ``fit`` or ``predict`` (``name``), as ``keras.Model`` defines it when
    ``model`` is a KerasHub task without a preprocessor.

    KerasHub's ``Task.fit`` and ``predict`` turn every input that is not already a
    ``tf.data`` or grain dataset (a ``PyDataset``, NumPy arrays) into a ``tf.data``
    dataset, to map the preprocessor over it; that needs TensorFlow on every backend.
    With no preprocessor that conversion is all they add, so ``keras.Model``'s own
    method (which reads a ``PyDataset`` or arrays natively) does the same work.
    """
    if hasattr(model, "preprocessor") and model.preprocessor is None:
        return getattr(keras.Model, name).__get__(model)
    return getattr(model, name)


def predict_masks(model, images, batch_size=32):
    """The class of every pixel (``argmax`` of the model's output), int ``(N, H, W)``."""
    predict = _keras_method(model, "predict")
    return np.asarray(predict(images, batch_size=batch_size, verbose=0)).argmax(-1)


def train_and_evaluate(
    steps=400,
    batch_size=16,
    image_size=64,
    seed=0,
    eval_images=64,
    learning_rate=3e-3,
    progress=True,
    history_every=0,
    model="deeplab",
    variant=None,
):
    """Train both models of a pair for ``steps`` steps with ``model.fit`` on identical
    batches (:class:`ShapesBatches`) and evaluate them on ``eval_images`` held-out
    images (another seed).

    ``model="deeplab"`` (:func:`build_segmentation_models`, TensorFlow only) or
    ``"segformer"`` (:func:`build_segformer_models`, any backend; images scaled to
    [0, 1], logits); ``variant`` is the SAPA variant (default
    :data:`DEFAULT_VARIANTS`). On TensorFlow the batches reach ``fit`` through
    :func:`static_dataset` (static shapes, faster); elsewhere ``fit`` reads the
    ``PyDataset`` itself (no tf.data).

    Adam with a cosine decay of ``learning_rate`` to 0 (the last steps settle the
    weights and the batch-norm statistics, so the held-out numbers are not a snapshot of
    a noisy step). ``progress`` shows Keras's progress bar. A smoke run of at most
    :data:`EAGER_STEPS` steps runs eagerly on TensorFlow (cheaper than tracing).

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
    check_model(model)
    variant = variant or DEFAULT_VARIANTS[model]

    if model == "deeplab":
        models = build_segmentation_models(image_size, seed=seed, variant=variant)
        image_scale, from_logits = 1.0, False
    else:
        models = build_segformer_models(image_size, seed=seed, variant=variant)
        image_scale, from_logits = 1.0 / 255.0, True
    eval_x, eval_y = data.make_shapes(eval_images, image_size, seed=[seed, 2])
    model_x = (eval_x * image_scale).astype(np.float32) if image_scale != 1.0 else eval_x
    on_tensorflow = keras.config.backend() == "tensorflow"
    results, history, predictions = {}, {}, {}
    for name, net in models.items():
        keras.utils.set_random_seed(seed)
        net.compile(
            optimizer=keras.optimizers.Adam(
                keras.optimizers.schedules.CosineDecay(learning_rate, steps)
            ),
            run_eagerly=on_tensorflow and steps <= EAGER_STEPS,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
            # An empty list, not None: None would keep the pixel accuracy that
            # KerasHub's constructor compiled in (Keras keeps earlier metrics on None).
            metrics=[],
        )
        # The optimizer's slots now, not in the first step: a tf.function that creates
        # variables is traced twice, and that second trace was half of a short run's time
        # (a 2-step fit of the SAPA DeepLab: 34.7 s -> 17.7 s).
        net.optimizer.build(net.trainable_variables)
        if progress:
            print(f"{name}:")
        log = StepLog(model_x, eval_y, history_every, steps)
        batches = ShapesBatches(steps, batch_size, image_size, seed, image_scale=image_scale)
        with warnings.catch_warnings():
            # KerasCV's ResNetV2 backbone has a final batch norm that DeepLab's
            # decoder never uses: Keras warns that it gets no gradient.
            warnings.filterwarnings(
                "ignore", message=r"Gradients do not exist for variables \['post_bn"
            )
            _keras_method(net, "fit")(
                static_dataset(batches) if on_tensorflow else batches,
                epochs=1,
                shuffle=False,
                callbacks=[log],
                verbose=1 if progress else 0,
            )
        history[name] = log.log
        pred = predict_masks(net, model_x)
        predictions[name] = pred
        results[name] = {
            "miou": data.mean_iou(eval_y, pred)[0],
            "boundary_f": data.boundary_f_score(eval_y, pred, tolerance=1)[0],
            "params": net.count_params(),
            "seconds": log.seconds,
        }
    return {
        "results": results,
        "history": history,
        "models": models,
        "eval": (eval_x, eval_y),
        "predictions": predictions,
    }


def train_seeds(seeds, **kwargs):
    """:func:`train_and_evaluate` once per seed of ``seeds`` (same other arguments).

    Returns:
        ``{"per_seed": {seed: results}, "last": the last seed's full outcome}`` (only
        the last run keeps its models and predictions, to bound memory).
    """
    seeds = [int(seed) for seed in seeds]
    if not seeds:
        raise ValueError(f"`seeds` must name at least one seed. Received: seeds={seeds!r}")
    per_seed, outcome = {}, None
    for seed in seeds:
        outcome = train_and_evaluate(seed=seed, **kwargs)
        per_seed[seed] = outcome["results"]
    return {"per_seed": per_seed, "last": outcome}


def format_seed_table(per_seed):
    """A plain-text table of :func:`train_seeds`'s ``per_seed``: one row per seed with
    both models' mIoU and boundary F and SAPA minus stock, then the mean (and the
    sample standard deviation over seeds when there are several) and how many seeds
    SAPA wins."""
    header = (
        f"{'seed':>6}  {'mIoU stock':>10}  {'mIoU SAPA':>9}  {'diff':>7}  "
        f"{'bF stock':>8}  {'bF SAPA':>7}  {'diff':>7}"
    )
    lines = [header, "-" * len(header)]
    rows = []
    for seed, results in per_seed.items():
        row = (
            results[STOCK]["miou"],
            results[SAPA]["miou"],
            results[STOCK]["boundary_f"],
            results[SAPA]["boundary_f"],
        )
        rows.append(row)
        lines.append(
            f"{seed:>6}  {row[0]:>10.3f}  {row[1]:>9.3f}  {row[1] - row[0]:>+7.3f}  "
            f"{row[2]:>8.3f}  {row[3]:>7.3f}  {row[3] - row[2]:>+7.3f}"
        )
    rows = np.array(rows, dtype=np.float64)
    mean = rows.mean(axis=0)
    lines.append("-" * len(header))
    lines.append(
        f"{'mean':>6}  {mean[0]:>10.3f}  {mean[1]:>9.3f}  {mean[1] - mean[0]:>+7.3f}  "
        f"{mean[2]:>8.3f}  {mean[3]:>7.3f}  {mean[3] - mean[2]:>+7.3f}"
    )
    if len(rows) > 1:
        std = rows.std(axis=0, ddof=1)
        d_miou, d_bf = rows[:, 1] - rows[:, 0], rows[:, 3] - rows[:, 2]
        lines.append(
            f"{'std':>6}  {std[0]:>10.3f}  {std[1]:>9.3f}  {d_miou.std(ddof=1):>7.3f}  "
            f"{std[2]:>8.3f}  {std[3]:>7.3f}  {d_bf.std(ddof=1):>7.3f}"
        )
    wins_miou = int((rows[:, 1] > rows[:, 0]).sum())
    wins_bf = int((rows[:, 3] > rows[:, 2]).sum())
    lines.append(
        f"SAPA higher on {wins_miou}/{len(rows)} seeds (mIoU), {wins_bf}/{len(rows)} (boundary F)"
    )
    return "\n".join(lines)


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
