"""Does ``model.fit`` cost the demo's training anything against a hand-written
``train_on_batch`` loop? (``python scripts/bench_demo_fit.py [--steps 10 --rounds 5]``)

Both train the SAPA DeepLabV3Plus of ``keras_sapa.demo`` on the same generated batches
with the same model (each path traced once before timing); rounds alternate
the two so that load from other processes hits both alike. Prints the median seconds per
step of each and their ratio (fit / loop).
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_sapa.demo import train  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    model = train.build_segmentation_models(64)[train.SAPA]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    # Trace both paths before timing (fit feeds a dataset iterator: its own trace).
    model.train_on_batch(*train.train_batch(0, args.batch_size, 64, 0))
    model.fit(train.static_dataset(train.ShapesBatches(2, args.batch_size, 64, 0)), verbose=0)
    loop, fit = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for step in range(args.steps):
            model.train_on_batch(*train.train_batch(step, args.batch_size, 64, 0))
        loop.append((time.perf_counter() - start) / args.steps)
        start = time.perf_counter()
        model.fit(
            train.static_dataset(train.ShapesBatches(args.steps, args.batch_size, 64, 0)),
            verbose=0,
        )
        fit.append((time.perf_counter() - start) / args.steps)
    loop_s, fit_s = float(np.median(loop)), float(np.median(fit))
    for label, seconds, rounds in (
        ("train_on_batch loop", loop_s, loop),
        ("model.fit", fit_s, fit),
    ):
        per_round = [round(1000 * v) for v in rounds]
        print(f"{label + ':':<20} {1000 * seconds:.1f} ms/step (rounds {per_round})")
    print(f"fit / loop: {fit_s / loop_s:.2f}")


if __name__ == "__main__":
    main()
