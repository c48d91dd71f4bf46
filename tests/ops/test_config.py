"""OpsConfig: read from the environment once, validated, changed for a block or for good."""

from __future__ import annotations

import pytest

from vnmsparse import ops
from vnmsparse.ops import OpsConfig, config, configure, set_config


def test_defaults_and_environment():
    assert OpsConfig.from_env({}) == OpsConfig(kernel=None, wgmma=True, pdl=True)
    env = {"VNMSPARSE_WGMMA": "0", "VNMSPARSE_PDL": "0", "VNMSPARSE_KERNEL": ""}
    assert OpsConfig.from_env(env) == OpsConfig(wgmma=False, pdl=False)
    name = ops.KERNELS[0].name
    assert OpsConfig.from_env({"VNMSPARSE_KERNEL": name}).kernel == name


@pytest.mark.parametrize("env", [{"VNMSPARSE_WGMMA": "yes"}, {"VNMSPARSE_PDL": "2"}, {"VNMSPARSE_KERNEL": "no_such_kernel"}])
def test_bad_environment_is_refused_with_the_variable_named(env):
    with pytest.raises(ValueError, match=r"VNMSPARSE_\w+ must be 0 or 1|compiled kernel name"):
        OpsConfig.from_env(env)


def test_fields_are_validated():
    with pytest.raises(TypeError, match="wgmma must be a bool"):
        OpsConfig(wgmma=1)
    with pytest.raises(TypeError, match="unknown OpsConfig field"):
        config().replace(wgmmma=False)
    with pytest.raises(TypeError, match="unknown OpsConfig field"):  # a per-layer choice: VNMLinear(two_four_copy=)
        config().replace(two_four_copy=True)
    with pytest.raises(TypeError, match="must be an OpsConfig"):
        set_config({"wgmma": False})


def test_configure_restores_the_previous_configuration_even_on_error():
    before = config()
    with configure(wgmma=not before.wgmma) as inside:
        assert config() is inside and inside.wgmma != before.wgmma
    assert config() is before
    with pytest.raises(RuntimeError):
        with configure(pdl=False):
            raise RuntimeError("inside")
    assert config() is before
    try:
        set_config(before.replace(wgmma=False))
        assert not config().wgmma
    finally:
        set_config(before)
