"""Operator images: sandbox_create picks from allowed_images; a network profile may name the image its sandboxes use."""

import pytest

from integrations import NetworkProfile, OperatorConfig, SandboxManager, ToolError
from integrations.config import ConfigError, load_config
from integrations.models import SandboxCreateInput
from tests.unit.integrations.fakes import FakeBackend

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend():
    return "asyncio"


def config():
    return OperatorConfig(allowed_images=("default", "mytools:1", "node"),
                          network_profiles={"build": NetworkProfile(allow=("pypi",), image="mytools:1")})


async def test_profile_image_then_request_image_then_default():
    backend = FakeBackend()
    async with SandboxManager(config(), backend=backend, reap=False, environ={}) as mgr:
        await mgr.create(SandboxCreateInput(network="build"))
        await mgr.create(SandboxCreateInput(network="build", image="node"))
        await mgr.create(SandboxCreateInput())
        with pytest.raises(ToolError) as info:
            await mgr.create(SandboxCreateInput(image="unlisted"))
        assert info.value.code == "not_allowed" and "mytools:1" in str(info.value.hint)
    assert [b.options.image for b in backend.booted] == ["mytools:1", "node", "default"]


def test_a_profile_image_must_be_allowed(tmp_path):
    path = tmp_path / "gondolin.toml"
    path.write_text('allowed_images = ["default"]\n[network.profiles.build]\nimage = "mytools:1"\n')
    with pytest.raises(ConfigError, match="names image 'mytools:1', which is not in allowed_images"):
        load_config(path)
