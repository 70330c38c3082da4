"""Helper of tests/test_backends.py (not a test module): on JAX with two host CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), one training step
of a model with a SAPA layer under ``keras.distribution.DataParallel`` must give the
weights of the same step on one device with the same global batch."""

import jax
import keras
import numpy as np

from keras_sapa import SAPA


def train_step(distribution):
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(0)
        x_in = keras.Input((None, None, 8))
        guide_in = keras.Input((None, None, 6))
        out = SAPA(kernel_size=3, embedding_dim=4, variant="gated")(x_in, guide_in)
        model = keras.Model([x_in, guide_in], keras.layers.Conv2D(2, 1)(out))
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        rng = np.random.default_rng(3)
        x = rng.standard_normal((4, 4, 4, 8)).astype(np.float32)
        guide = rng.standard_normal((4, 8, 8, 6)).astype(np.float32)
        target = rng.standard_normal((4, 8, 8, 2)).astype(np.float32)
        model.fit([x, guide], target, batch_size=4, epochs=1, shuffle=False, verbose=0)
        devices = {d for w in model.trainable_weights for d in w.value.sharding.device_set}
        return [np.asarray(w.value) for w in model.trainable_weights], len(devices)
    finally:
        keras.distribution.set_distribution(None)


def main():
    assert len(jax.devices("cpu")) == 2, jax.devices()
    one, one_devices = train_step(None)
    two, two_devices = train_step(keras.distribution.DataParallel(devices=jax.devices("cpu")))
    assert one_devices == 1 and two_devices == 2, (one_devices, two_devices)
    worst = 0.0
    for a, b in zip(one, two):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"DataParallel over 2 devices matches 1 device: max diff {worst:.2e}")


if __name__ == "__main__":
    main()
