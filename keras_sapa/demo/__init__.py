"""What SAPA does, on real photographs and on a small segmentation task.

``python -m keras_sapa demo`` (or ``keras-sapa demo``) runs it from the command line;
the tutorial notebooks use the same public functions, listed here by module.

Guided upsampling, no training (:mod:`keras_sapa.demo.guided`): a photograph is shrunk
by ``scale`` (the mean of each ``scale x scale`` block) and brought back to full size by
nearest, bilinear and bicubic resizing, and by SAPA guided by the full-resolution
photograph through a fixed colour-and-position embedding under which SAPA's dot product
is a Gaussian of colour and position distance (joint bilateral upsampling): each output
pixel mixes the low-resolution pixels that look like it. SAPA sees the full-resolution
photograph and the resizers do not: it shows what a guide lets SAPA do, not a fair
super-resolution benchmark.

- :mod:`~keras_sapa.demo.images`: :func:`load_image`, :func:`center_crop`,
  :func:`downsample`, :func:`upsample_nearest`, :func:`upsample_resize`,
  :func:`check_scale`, :data:`SAMPLE_IMAGES`, :class:`DemoError`.
- :mod:`~keras_sapa.demo.guided`: :func:`colour_embedding`, :func:`sapa_upsample`,
  :func:`guided_upsampling` (every method, with measures).
- :mod:`~keras_sapa.demo.deform`: SAPA-D (:class:`keras_sapa.SAPADeform`) on the same
  task, its similarity fixed and its offsets trained on another photograph
  (``guided_upsampling(deform_steps=...)``, ``--deform``): :func:`build_deform_upsampler`,
  :func:`fit_deform_upsampler`, :func:`deform_upsample`, :func:`sampling_positions`.
- :mod:`~keras_sapa.demo.metrics`: :func:`psnr`, :class:`EdgeReference` (PSNR at edges,
  edge sharpness, edge F1), :func:`kernel_spread`, :func:`format_table`; the
  segmentation metrics :func:`mean_iou`, :func:`boundary_f_score` (from
  :mod:`keras_sapa.demo.data`).
- :mod:`~keras_sapa.demo.figures`: :func:`save_figure` / :func:`guided_figure`,
  :func:`pick_crop`, :func:`boundary_points`, :func:`draw_kernels`,
  :func:`save_deform_figure` / :func:`deform_figure` (where SAPA-D's points moved),
  :func:`save_training_figure` / :func:`training_figure`.

Segmentation training (:mod:`keras_sapa.demo.train`, KerasCV, TensorFlow backend):
KerasCV's DeepLabV3Plus (8x bilinear decoder upsampling) against
:class:`keras_sapa.models.SAPADeepLabV3Plus` (three SAPA-G stages), same backbone, seed,
data and steps, trained with ``model.fit`` on the shapes task of :mod:`keras_sapa.demo.data`:
:func:`build_segmentation_models`, :func:`train_and_evaluate`,
:func:`format_training_table`, :class:`ShapesBatches` (the batches, a
``keras.utils.PyDataset``; :func:`static_dataset` feeds them to ``fit`` with static
shapes), :class:`StepLog` (the callback recording per-step loss and
held-out metrics).

KerasHub's SegFormer (every backend; ``--model segformer``): the stock
``SegFormerImageSegmenter`` against :class:`keras_sapa.models.SAPASegFormer` (SAPA-B,
K=5, d=32) on the same tiny MiT encoder, seed and batches:
:func:`build_segformer_models`, :func:`train_and_evaluate` with ``model="segformer"``,
:func:`train_seeds` (several seeds) and :func:`format_seed_table`.

Command line (:mod:`keras_sapa.demo.cli`): :func:`main`, :func:`build_parser`.
"""

from keras_sapa.demo.cli import build_parser
from keras_sapa.demo.cli import main
from keras_sapa.demo.deform import build_deform_upsampler
from keras_sapa.demo.deform import deform_upsample
from keras_sapa.demo.deform import fit_deform_upsampler
from keras_sapa.demo.deform import sampling_positions
from keras_sapa.demo.figures import boundary_points
from keras_sapa.demo.figures import deform_figure
from keras_sapa.demo.figures import draw_kernels
from keras_sapa.demo.figures import guided_figure
from keras_sapa.demo.figures import pick_crop
from keras_sapa.demo.figures import save_deform_figure
from keras_sapa.demo.figures import save_figure
from keras_sapa.demo.figures import save_training_figure
from keras_sapa.demo.figures import training_figure
from keras_sapa.demo.guided import colour_embedding
from keras_sapa.demo.guided import guided_upsampling
from keras_sapa.demo.guided import sapa_upsample
from keras_sapa.demo.images import SAMPLE_IMAGES
from keras_sapa.demo.images import DemoError
from keras_sapa.demo.images import center_crop
from keras_sapa.demo.images import check_scale
from keras_sapa.demo.images import downsample
from keras_sapa.demo.images import load_image
from keras_sapa.demo.images import upsample_nearest
from keras_sapa.demo.images import upsample_resize
from keras_sapa.demo.metrics import EdgeReference
from keras_sapa.demo.metrics import boundary_f_score
from keras_sapa.demo.metrics import format_table
from keras_sapa.demo.metrics import kernel_spread
from keras_sapa.demo.metrics import mean_iou
from keras_sapa.demo.metrics import psnr
from keras_sapa.demo.train import ShapesBatches
from keras_sapa.demo.train import StepLog
from keras_sapa.demo.train import build_segformer_models
from keras_sapa.demo.train import build_segmentation_models
from keras_sapa.demo.train import format_seed_table
from keras_sapa.demo.train import format_training_table
from keras_sapa.demo.train import static_dataset
from keras_sapa.demo.train import train_and_evaluate
from keras_sapa.demo.train import train_seeds

__all__ = [
    "SAMPLE_IMAGES",
    "DemoError",
    "EdgeReference",
    "ShapesBatches",
    "StepLog",
    "boundary_f_score",
    "boundary_points",
    "build_deform_upsampler",
    "build_parser",
    "build_segformer_models",
    "build_segmentation_models",
    "center_crop",
    "check_scale",
    "colour_embedding",
    "deform_figure",
    "deform_upsample",
    "downsample",
    "draw_kernels",
    "fit_deform_upsampler",
    "format_seed_table",
    "format_table",
    "format_training_table",
    "guided_figure",
    "guided_upsampling",
    "kernel_spread",
    "load_image",
    "main",
    "mean_iou",
    "pick_crop",
    "psnr",
    "sampling_positions",
    "sapa_upsample",
    "save_deform_figure",
    "save_figure",
    "save_training_figure",
    "static_dataset",
    "train_and_evaluate",
    "train_seeds",
    "training_figure",
    "upsample_nearest",
    "upsample_resize",
]
