"""Test setup: quiet TensorFlow logs, 2 logical CPU devices (for MirroredStrategy tests), seeds per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pytest
import tensorflow as tf

# Before any TensorFlow op: split the CPU into 2 logical devices. The default strategy still runs on /CPU:0 only;
# tests/test_distribution.py mirrors over both.
_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(1234)
    yield
