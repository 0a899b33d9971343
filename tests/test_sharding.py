"""Tests of the mesh and batch sharding (1 CPU device here; 4 emulated in a subprocess)."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from dermseg_jax import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_and_shardings():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert mesh.devices.size == jax.device_count()
    assert sharding.replicated_sharding(mesh).spec == jax.P()
    assert sharding.data_sharding(mesh).spec == jax.P("data")


def test_shard_batch_keeps_numeric_arrays_and_drops_ids():
    mesh = sharding.make_mesh()
    batch = {"image": np.ones((2, 4, 4, 3), np.float32), "id": np.array([b"a", b"b"])}
    out = sharding.shard_batch(batch, mesh)
    assert set(out) == {"image"}
    assert out["image"].shape == (2, 4, 4, 3)
    assert out["image"].sharding.spec == jax.P("data")


def test_batch_size_must_divide_device_count():
    mesh = sharding.make_mesh()
    with pytest.raises(ValueError, match="config.train.batch_size=0"):
        sharding.check_batch_size(0, mesh, "config.train.batch_size")


def test_four_devices_split_the_batch_and_reject_odd_sizes():
    script = textwrap.dedent(
        """
        import jax, numpy as np
        from dermseg_jax import sharding
        mesh = sharding.make_mesh()
        assert jax.device_count() == 4
        out = sharding.shard_batch({"x": np.arange(8.0).reshape(8, 1)}, mesh)
        shapes = [s.data.shape for s in out["x"].addressable_shards]
        assert shapes == [(2, 1)] * 4, shapes
        try:
            sharding.shard_batch({"x": np.zeros((6, 1))}, mesh)
        except ValueError as e:
            assert "multiple of the device count (4 devices" in str(e), e
        else:
            raise AssertionError("no error for a batch of 6 on 4 devices")
        print("OK")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
