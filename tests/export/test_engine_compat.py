"""`cotap.core.engine_compat`: engines refused on a mismatched GPU or TensorRT version."""

from __future__ import annotations

import pytest

from cotap.core.artifacts import EngineArtifact
from cotap.core.engine_compat import (
    DeviceFacts,
    EngineCompatibilityError,
    check_engine_compatible,
    engine_compatibility,
    parse_version,
)


def engine(**kw: object) -> EngineArtifact:
    base: dict[str, object] = dict(
        file="engines/orin/model.plan",
        target="orin",
        precision="fp16",
        sizes=((224, 224),),
        min_batch=1,
        opt_batch=4,
        max_batch=8,
        tensorrt_version="10.3.0.30",
        gpu_name="Orin",
        compute_capability="8.7",
    )
    base.update(kw)
    return EngineArtifact(**base)  # type: ignore[arg-type]


ORIN = DeviceFacts("Orin", "8.7", "10.3.0.30", integrated=True)


def test_same_machine_is_fine() -> None:
    verdict = check_engine_compatible(engine(), ORIN)
    assert verdict.ok and not verdict.warnings
    assert check_engine_compatible(engine().to_dict(), ORIN).ok  # the manifest dict works too


@pytest.mark.parametrize(
    ("device", "needle"),
    [
        (DeviceFacts("Tesla T4", "7.5", "10.3.0.30"), "built for compute capability 8.7"),
        (DeviceFacts("Orin", "8.7", "10.4.0.26", integrated=True), "built with TensorRT 10.3.0.30"),
        (DeviceFacts("Orin", "8.7", "10.3.0.31", integrated=True), "this machine has TensorRT 10.3.0.31"),
    ],
)
def test_mismatch_is_refused_with_what_to_rebuild(device: DeviceFacts, needle: str) -> None:
    with pytest.raises(EngineCompatibilityError) as err:
        check_engine_compatible(engine(), device)
    message = str(err.value)
    assert needle in message
    assert "cotap export tensorrt --bundle BUNDLE --target orin" in message
    assert device.gpu_name in message and device.tensorrt_version in message


def test_same_cc_other_gpu_warns() -> None:
    built = engine(gpu_name="NVIDIA A10", compute_capability="8.6")
    verdict = engine_compatibility(built, DeviceFacts("NVIDIA RTX A6000", "8.6", "10.3.0.30"))
    assert verdict.ok and "rebuild here" in verdict.warnings[0]


def test_ampere_plus_and_version_compatible() -> None:
    e = engine(hardware_compatibility_level="ampere_plus", compute_capability="8.9", gpu_name="L4")
    assert engine_compatibility(e, DeviceFacts("H100", "9.0", "10.3.0.30")).ok
    assert not engine_compatibility(e, DeviceFacts("T4", "7.5", "10.3.0.30")).ok
    assert not engine_compatibility(e, ORIN).ok  # not on Jetson
    vc = engine(extra={"version_compatible": True})
    assert engine_compatibility(vc, DeviceFacts("Orin", "8.7", "10.7.0.1")).ok  # later runtime
    assert not engine_compatibility(vc, DeviceFacts("Orin", "8.7", "10.2.0.1")).ok  # older runtime
    same_cc = engine(hardware_compatibility_level="same_compute_capability")
    assert engine_compatibility(same_cc, DeviceFacts("Other", "8.7", "10.3.0.30")).ok
    assert not engine_compatibility(same_cc, DeviceFacts("Other", "8.6", "10.3.0.30")).ok


def test_parse_version() -> None:
    assert parse_version("8.6.1.post1") == (8, 6, 1)
    assert parse_version("10.3.0.30") == (10, 3, 0, 30)
    with pytest.raises(ValueError):
        parse_version("x")
