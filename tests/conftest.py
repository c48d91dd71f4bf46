"""Shared test settings: hypothesis profiles sized for the 2-core CI machine."""

import os

import pytest
from hypothesis import HealthCheck, settings

from tiny_models import WordTokenizer, tiny_llama

settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def tiny_job(monkeypatch):
    """The `vnm` jobs on a 2-layer LLaMA and a made-up text (every named text is that text), so they run in seconds."""
    import vnmsparse.app.data
    import vnmsparse.app.models

    text = " ".join(f"w{i % 97} v{(i * 7) % 31}" for i in range(2000))
    monkeypatch.setattr(vnmsparse.app.models, "load_causal_lm", lambda *a, **k: (tiny_llama(), WordTokenizer()))
    monkeypatch.setattr(vnmsparse.app.data, "read_text", lambda name: text)
