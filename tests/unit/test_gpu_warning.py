"""`flowers train` warns in one line when nvidia-smi sees a GPU the backend's installed build cannot use.

backend.device and host.nvidia_gpus are replaced, so no framework is imported and no GPU is needed.
"""

import pytest

from flowers import backend, host


@pytest.mark.parametrize("name", backend.BACKENDS)
def test_a_visible_gpu_the_build_cannot_use_is_named_with_the_fix(monkeypatch, name):
    monkeypatch.setattr(host, "nvidia_gpus", lambda: ["NVIDIA L4"])
    monkeypatch.setattr(backend, "device", lambda n: "cpu")
    monkeypatch.setattr(host, "package_version",
                        lambda dist: {"tensorflow-cpu": "2.21.0", "torch": "2.13.0+cpu",
                                      "jax": "0.10.2"}.get(dist))
    warning = backend.gpu_warning(name)
    assert "\n" not in warning
    assert warning.startswith(f"an NVIDIA GPU is visible (NVIDIA L4) but the installed {name} build")
    assert f"so {name} trains on the CPU; for the GPU: {backend.GPU_INSTALL[name]}" in warning
    if name == "tensorflow":
        assert "(tensorflow-cpu 2.21.0)" in warning and ".[tensorflow-gpu]" in warning


@pytest.mark.parametrize("gpus, device", [([], "cpu"), (["NVIDIA L4"], "NVIDIA L4")])
def test_no_warning_without_a_gpu_or_when_the_build_uses_it(monkeypatch, gpus, device):
    monkeypatch.setattr(host, "nvidia_gpus", lambda: gpus)
    monkeypatch.setattr(backend, "device", lambda n: device)
    assert backend.gpu_warning("tensorflow") is None


def test_every_gpu_extra_named_in_the_fix_exists():
    import tomllib

    from flowers.paths import PROJECT_ROOT

    extras = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["tensorflow-gpu"] == ["tensorflow[and-cuda]==2.21.0"]
    for fix in backend.GPU_INSTALL.values():
        for extra in (part.split("]")[0] for part in fix.split(".[")[1:]):
            assert extra in extras, extra
