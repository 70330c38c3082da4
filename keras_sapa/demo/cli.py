"""``python -m keras_sapa demo``: the command line of the demo.

Guided upsampling of a photograph (:func:`keras_sapa.demo.guided_upsampling`), a table
and a figure; with ``--deform``, SAPA-D beside it and a figure of its sampled points;
with ``--train``, a segmentation comparison, stock against SAPA
(:func:`keras_sapa.demo.train_and_evaluate`; ``--model deeplab`` or ``segformer``,
``--seeds`` for several seeds).
"""

import argparse
import math
import os
import time

from keras_sapa.demo import deform
from keras_sapa.demo import figures
from keras_sapa.demo import guided
from keras_sapa.demo import images
from keras_sapa.demo import metrics
from keras_sapa.demo import train
from keras_sapa.layers import VARIANTS
from keras_sapa.ops import _checks

DEFAULT_OUT = "sapa_demo_out"


def _integer_option(option, check=_checks.positive_int, **requirement):
    """An argparse ``type`` for ``option``: the text as an int validated by ``check``
    (a :mod:`keras_sapa.ops._checks` validator, called as ``check(option, value,
    **requirement)``), its ``ValueError`` turned into a usage error."""

    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"`{option}` must be an integer. Received: {option}={text!r}"
            ) from None
        try:
            return check(option, value, **requirement)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _add_integer_option(
    parser, option, check=_checks.positive_int, *, default, help, **requirement
):
    """``parser.add_argument(option, ...)`` for an integer option validated by ``check``
    (see :func:`_integer_option`)."""
    parser.add_argument(
        option,
        type=_integer_option(option, check, **requirement),
        default=default,
        help=help,
    )


def _kernel_size(option, value):
    try:
        return _checks.check_kernel_size(value)
    except ValueError:
        raise ValueError(
            f"`{option}` must be a positive odd integer. Received: {option}={value}"
        ) from None


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _seed_list(text):
    """An argparse ``type`` for ``--seeds``: comma-separated non-negative integers."""
    seeds = []
    for part in text.split(","):
        try:
            seeds.append(_checks.integer("--seeds", int(part), "non-negative integers", minimum=0))
        except ValueError:
            raise argparse.ArgumentTypeError(
                "`--seeds` must be comma-separated non-negative integers. "
                f"Received: --seeds={text!r}"
            ) from None
    return seeds


def build_parser():
    """The ``argparse`` parser of ``python -m keras_sapa demo``."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_sapa demo",
        description=(
            "SAPA against nearest, bilinear and bicubic upsampling on a photograph, "
            "with no training: the photo is shrunk by --scale (block mean) and brought "
            "back to full size; SAPA is guided by the full-resolution photo through a "
            "fixed colour-and-position embedding (each output pixel mixes the "
            "low-resolution pixels that look like it). Prints PSNR and edge measures "
            "against the original and writes a figure to --out. With --train, also "
            "trains a stock segmentation model and its SAPA version (--model: KerasCV's "
            "DeepLabV3Plus or KerasHub's SegFormer) on a synthetic shapes task and prints "
            "mIoU and boundary F-score."
        ),
        epilog=(
            "Columns: PSNR over the image and within 1 px of the original's edges (Canny, "
            "sigma 2); edge sharpness = mean gradient magnitude on the original's edge "
            "pixels, relative to the original (100% = as sharp); edge F1 = Canny edges "
            "of the result against those of the original, 1 px tolerance. SAPA sees the "
            "full-resolution photo and the resizers do not: a demonstration of what the "
            "guide does, not a fair super-resolution benchmark."
        ),
    )
    parser.add_argument(
        "--image",
        default=images.DEFAULT_IMAGE,
        help=f"a scikit-image sample ({', '.join(images.SAMPLE_IMAGES)}) or the path of an "
        "image file (default: %(default)s)",
    )
    _add_integer_option(
        parser,
        "--scale",
        _checks.integer,
        requirement="an integer >= 2",
        minimum=2,
        default=guided.DEFAULT_SCALE,
        help="integer downsampling factor >= 2 (any integer: SAPA upsamples in one step "
        f"with up_factor=scale); the low-resolution image must keep at least "
        f"{images.MIN_LOW_RES} pixels a side (default: %(default)s)",
    )
    _add_integer_option(
        parser,
        "--kernel-size",
        _kernel_size,
        default=guided.DEFAULT_KERNEL_SIZE,
        help="SAPA window K (odd): each output pixel mixes K x K low-resolution pixels "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--color-sigma",
        type=_positive_float,
        default=guided.DEFAULT_COLOR_SIGMA,
        help="colour temperature of the SAPA similarity (RGB in [0, 1]); smaller = sharper "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--space-sigma",
        type=_positive_float,
        default=guided.DEFAULT_SPACE_SIGMA,
        help="spatial temperature of the SAPA similarity, in low-resolution pixels "
        "(default: %(default)s)",
    )
    _add_integer_option(
        parser,
        "--crop",
        default=None,
        help="use the centred CROP x CROP part of the image (default: the whole image)",
    )
    parser.add_argument(
        "--deform",
        action="store_true",
        help="also run SAPA-D (keras_sapa.SAPADeform) on the photo: a fixed colour "
        "similarity with P=9 sampled points per output pixel whose offsets are first "
        f"trained on another photograph ({deform.DEFAULT_TRAIN_IMAGE!r}); adds a SAPA-D "
        "row and a figure of where the points moved",
    )
    _add_integer_option(
        parser,
        "--deform-steps",
        default=deform.DEFAULT_STEPS,
        help="with --deform: training steps of the SAPA-D offsets (default: %(default)s)",
    )
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help="directory for the figures (default: %(default)s)"
    )
    parser.add_argument(
        "--train",
        action="store_true",
        help="also train a stock model and its SAPA version (--model) on the built-in "
        "shapes task with Keras fit, same seed and batches, and report mIoU and boundary "
        "F-score (a few minutes on 2 CPU cores; --model deeplab needs the TensorFlow "
        "backend, --model segformer runs on TensorFlow and JAX)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="with --train: a short smoke run (about a minute; numbers not meaningful)",
    )
    _add_integer_option(
        parser,
        "--steps",
        default=None,
        help="with --train: training steps per model (default 400, --quick 15)",
    )
    _add_integer_option(
        parser,
        "--batch-size",
        default=16,
        help="with --train: batch size (default: %(default)s)",
    )
    _add_integer_option(
        parser,
        "--seed",
        _checks.integer,
        requirement="a non-negative integer",
        minimum=0,
        default=0,
        help="with --train: seed of data and weights (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        choices=train.MODELS,
        default="deeplab",
        help="with --train: the pair to compare: 'deeplab' (KerasCV DeepLabV3Plus against "
        "SAPADeepLabV3Plus, TensorFlow only) or 'segformer' (KerasHub "
        "SegFormerImageSegmenter against SAPASegFormer on a tiny MiT encoder, any "
        "backend) (default: %(default)s)",
    )
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        default=None,
        help="with --train: the SAPA variant (default: gated for deeplab, bilinear, the "
        "paper's SegFormer setting, for segformer)",
    )
    parser.add_argument(
        "--seeds",
        type=_seed_list,
        default=None,
        help="with --train: several seeds, e.g. 0,1,2 (overrides --seed): one run per "
        "seed and a table of every seed, the mean and the spread",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep TensorFlow's start-up log lines on stderr (hidden by default)",
    )
    return parser


def run(args, parser=None):
    """Runs the demo for parsed ``args``; returns an exit code."""
    parser = parser or build_parser()
    try:
        image = images.load_image(args.image)
        if args.crop is not None:
            image = images.center_crop(image, args.crop)
        images.check_scale(args.scale, image.shape)
        if args.train and args.model == "deeplab":
            train.require_tensorflow()
    except (images.DemoError, RuntimeError) as error:
        parser.error(str(error))
    name = images.image_name(args.image)
    os.makedirs(args.out, exist_ok=True)

    start = time.perf_counter()
    result = guided.guided_upsampling(
        image,
        args.scale,
        args.kernel_size,
        args.color_sigma,
        args.space_sigma,
        deform_steps=args.deform_steps if args.deform else None,
    )
    ref = result["reference"]
    print(
        f"Guided upsampling of {name!r} ({ref.shape[1]}x{ref.shape[0]}), x{args.scale}, "
        f"SAPA K={args.kernel_size}, color_sigma={args.color_sigma}, "
        f"space_sigma={args.space_sigma}, no training"
        + (
            f" (SAPA-D: offsets trained on {deform.DEFAULT_TRAIN_IMAGE!r}):"
            if args.deform
            else ":"
        )
    )
    print(metrics.format_table(result["metrics"]))
    stem = os.path.splitext(name)[0]
    figure = figures.save_figure(
        result, os.path.join(args.out, f"guided_{stem}_x{args.scale}.png")
    )
    if args.deform:
        deform_path = figures.save_deform_figure(
            result, os.path.join(args.out, f"guided_{stem}_x{args.scale}_deform.png")
        )
        print(
            f"SAPA-D: offsets trained {args.deform_steps} steps on "
            f"{deform.DEFAULT_TRAIN_IMAGE!r}; figure: {deform_path}"
        )
    print(
        "SAPA sees the full-resolution photo (the guide); nearest, bilinear and bicubic do "
        "not.\nSo this shows what the guide lets SAPA do, not a fair super-resolution "
        "benchmark."
    )
    print(f"figure: {figure}  ({time.perf_counter() - start:.1f} s)")

    if args.train:
        _run_training(args)
    return 0


def _run_training(args):
    steps = args.steps or (15 if args.quick else 400)
    batch = min(args.batch_size, 8) if args.quick else args.batch_size
    seeds = args.seeds or [args.seed]
    variant = args.variant or train.DEFAULT_VARIANTS[args.model]
    if args.model == "deeplab":
        pair = f"DeepLabV3Plus (bilinear) and SAPA DeepLabV3Plus (SAPA-{variant[0].upper()})"
    else:
        pair = (
            f"SegFormer (bilinear) and SAPA SegFormer (SAPA-{variant[0].upper()}, K=5, d=32), "
            "tiny MiT encoder"
        )
    print(
        f"\nTraining {pair} on the shapes task: {steps} steps of {batch} images (64 x 64), "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}",
        flush=True,
    )
    outcome = None
    per_seed = {}
    for seed in seeds:
        if len(seeds) > 1:
            print(f"seed {seed}:", flush=True)
        outcome = train.train_and_evaluate(
            steps=steps,
            batch_size=batch,
            seed=seed,
            eval_images=32 if args.quick else 64,
            progress=not args.no_progress,
            model=args.model,
            variant=variant,
        )
        per_seed[seed] = outcome["results"]
        print(train.format_training_table(outcome["results"]), flush=True)
    if len(seeds) > 1:
        print("\nEvery seed (same batches and initial weights for both models of a seed):")
        print(train.format_seed_table(per_seed))
    print(
        "mIoU over the 4 classes and boundary F-score (1 px tolerance) on held-out images."
        + (" --quick: too few steps for the numbers to mean anything." if args.quick else "")
    )
    name = (
        "train_predictions.png"
        if args.model == "deeplab"
        else f"train_predictions_{args.model}.png"
    )
    figure = figures.save_training_figure(outcome, os.path.join(args.out, name))
    print(f"figure: {figure}" + (f" (seed {seeds[-1]})" if len(seeds) > 1 else ""))


def main(argv=None):
    """Entry point of ``python -m keras_sapa demo``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return run(args, parser)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 2)
